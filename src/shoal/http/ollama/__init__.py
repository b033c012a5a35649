"""The Ollama dialect (/api/*): routes (URLs), serving (translation onto the generate path),
model_management (pull, push, create, copy, delete, blobs), protocol (request bodies,
timestamps), info (tags/show/ps), templates (Go templates)."""
