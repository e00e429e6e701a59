"""Which device a script runs on, decided once: "auto" is CUDA when there is one, else the CPU.

eval.py, chat, web and the benches (`--device`), the training stages (`TrainConfig.device`),
lmms-eval's model (model_args `device=`) and demo.py (always "auto") all go through
`resolve_device`, so "auto" means one thing everywhere, and a device that cannot work stops the
script at once with one line instead of a CUDA error from deep inside the first `.to(device)`.
"""
from __future__ import annotations

import argparse

import torch

AUTO = ("auto", "", None)  # what asks for "the best device here"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """CUDA when available, else the CPU, for "auto" (or None, ""); otherwise `name`, checked."""
    if name in AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:0, ...)") from None


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`, as every script without a config dataclass for it takes it."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda, cuda:0, ...")
