"""shoal's HTTP server: one FastAPI app speaking the OpenAI and the Ollama dialects.

Each dialect is a thin translator (protocol.py: the wire models; serving.py: wire
request -> GenerateRequest -> wire response; routes.py: the endpoints) onto the one
GenerationService in generation.py, which owns admission, streaming and metrics.
"""
