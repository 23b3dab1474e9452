"""The serving engine: requests, the paged KV block manager with prefix caching, the
scheduler, the per-rank model runner and the step loop (docs/engine.md)."""
