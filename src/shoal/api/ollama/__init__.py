"""The Ollama dialect (/api/*): routes (URLs), serving (translation onto the generate path),
protocol (request bodies, durations, timestamps), info (tags/show/ps), templates (Go templates)."""
