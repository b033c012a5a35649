"""Who is calling and what they may use: API keys, the keys DB, principals (no HTTP)."""
