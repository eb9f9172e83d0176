"""kvtier.connectors: the KV connector interface (base), its registry (entry points and
`module:Class` paths) and the built-in connectors (`tiered`, `multi`)."""
