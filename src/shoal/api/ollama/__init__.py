"""The ollama dialect."""
