"""The OpenAI dialect (/v1/*, and vLLM's /tokenize and /detokenize): routes (URLs), serving
(translation onto the generate path), protocol (the wire models)."""
