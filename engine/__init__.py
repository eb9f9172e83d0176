"""The kvtier inference engine: config, scheduler, KV cache, models, runner, API, CLI."""
