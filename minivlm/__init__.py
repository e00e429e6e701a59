"""minivlm: a from-scratch, minimal vision-language model framework in plain PyTorch."""
