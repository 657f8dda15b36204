"""Model file formats: the Hugging Face directory (hf.py, its weights in safetensors.py) and GGUF
(gguf.py, gguf_tokenizer.py); each module checks everything it reads."""
