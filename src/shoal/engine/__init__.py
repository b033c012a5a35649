"""The engine: requests, the scheduler (continuous batching, chunked prefill, prefix caching),
the paged KV cache, the model runner, sampling, and the async/offline front ends (no HTTP)."""
