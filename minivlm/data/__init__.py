"""Data: the Sample unit, image loading, format readers, tokenizers and chat templates, batching,
and the synthetic shapes world."""
