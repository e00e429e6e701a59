"""Real weights in and out: Hugging Face and GGUF language models, PEFT adapters."""
