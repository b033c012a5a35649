"""The ground floor: shoal's errors, the engine configuration and sampling parameters (no torch, no HTTP)."""
