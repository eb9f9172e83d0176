"""The stored-value format: a versioned header with an xxh3 checksum, then the payload,
encoded by a registered codec (`raw`, `fp8`)."""
