"""The decoder's building blocks: paged attention, linear layers in both compute modes, RMSNorm,
rotary embeddings, and fast mode's int8 conversion."""
