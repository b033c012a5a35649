"""Models: configs, loaders (GGUF, safetensors), architectures, layers and kernels."""
