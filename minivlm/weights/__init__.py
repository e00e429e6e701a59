"""Weights in and out: our own checkpoints (checkpoint.py), Hugging Face and GGUF language models
(hf.py, gguf*.py), PEFT adapters (peft.py), and the name/shape checks they share (state_dict.py)."""
