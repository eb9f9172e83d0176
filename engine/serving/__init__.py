"""`kvtier serve`: an OpenAI-compatible HTTP server over the engine (see serve_cli.py)."""
