"""The model: Llama-style Transformer, CLIP vision tower, projector, the VLM that joins them, and
LISA's segmentation head on a SAM-style mask decoder; `build.py` builds them from configs."""
