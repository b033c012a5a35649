"""Residency: which models are loaded, kept apart from token scheduling (Ollama's sched.go idea).

Models load on a first request, stay while used, and unload after their keep_alive idles
out, or sooner when a new model needs the room (SHOAL_MAX_LOADED_MODELS, a memory budget).
"""
