"""shoal's HTTP edge: one FastAPI app speaking the OpenAI and the Ollama dialects.

Each dialect is a thin translator (protocol.py: the wire models; serving.py: wire request ->
GenerateRequest -> wire response; routes.py: the endpoints) onto the one GenerationService
in shoal.serving.generate. Middleware, the access/audit/trace sinks and the uvicorn server
live here too.
"""
