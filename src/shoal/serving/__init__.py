"""Serving: the one generate path both dialects call, and everything around it that is not HTTP.

Admission and quotas, residency (which models are loaded: on demand, kept while used, unloaded
when idle or when room is needed, Ollama's sched.go idea kept apart from token scheduling),
metrics state, server settings and the config file. No FastAPI import lives here.
"""
