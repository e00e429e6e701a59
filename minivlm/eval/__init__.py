"""Evaluation: generation on samples, VQA and segmentation loops, metrics, and the judge."""
