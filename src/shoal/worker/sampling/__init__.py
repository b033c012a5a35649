"""Building blocks of the sampler: per-row randomness, logits processing, filters."""
