"""Benchmarks of npllama against PyTorch, Hugging Face transformers and llama2.c (not part of the package)."""
