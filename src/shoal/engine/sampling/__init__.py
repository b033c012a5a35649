"""The sampler and its building blocks: the per-request row, per-row randomness, logits
processing, filters."""
