"""An on-disk cache of what a frozen encoder computes from an image, keyed by content.

A frozen encoder gives the same output for an image every epoch (and every run), and SAM's ViT-H
costs far more per image than the rest of a training step, so its output is computed once and
read back after that. Two encoders use it: SAM's image encoder for the mask decoder
(`--seg-image-encoder sam`) and a frozen vision tower (`--cache-image-features`).

    key = sha256(namespace, sha256(image file bytes))
    namespace = the encoder's weights (module_fingerprint) + its preprocessing, as a string
A changed image, another preprocessing or another checkpoint is therefore a different key: a
stale entry is never served, it is simply not found. Entries are written to a temporary file and
renamed into place (atomic on POSIX), so several DDP ranks can fill the same cache: a reader
sees a whole file or none, and two ranks that compute the same entry write the same bytes.

    ROOT/<namespace hash[:16]>/<key[:2]>/<key>.pt    one tensor per image (torch.save)
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed: an image or a 2.5 GB checkpoint alike)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and values): the same weights give the
    same fingerprint wherever they were loaded from (a SAM .pth or our checkpoint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def default_cache_root() -> Path:
    """$MINIVLM_CACHE, else $XDG_CACHE_HOME/minivlm, else ~/.cache/minivlm; then /features."""
    base = os.environ.get("MINIVLM_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivlm"
    return Path(base) / "features"


class FeatureCache:
    """`get(path)` returns the encoder's output for the image at `path`, computing it with
    `compute(path)` only when no entry exists for this namespace and these image bytes."""

    def __init__(self, root: str | Path, namespace: str,
                 compute: Callable[[Path | bytes], torch.Tensor]):
        self.namespace = namespace
        self.directory = Path(root) / hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self.compute = compute
        self.hits = self.misses = 0
        self._digests: dict[Path, str] = {}  # one read of each image file per run

    def key(self, image: str | Path | bytes) -> str:
        """An image file (read once per run), or an image's bytes (a parquet cell, a tar member)."""
        if isinstance(image, bytes):
            digest = hashlib.sha256(image).hexdigest()
        else:
            path = Path(image)
            if path not in self._digests:
                self._digests[path] = file_digest(path)
            digest = self._digests[path]
        return hashlib.sha256(f"{self.namespace}\n{digest}".encode()).hexdigest()

    def entry(self, path: str | Path | bytes) -> Path:
        key = self.key(path)
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, path: str | Path | bytes) -> torch.Tensor:
        entry = self.entry(path)
        if entry.is_file():
            self.hits += 1
            return self.read(entry)
        self.misses += 1
        image = path if isinstance(path, bytes) else Path(path)
        features = self.compute(image).detach().cpu().contiguous()
        self._write(entry, features)
        return features

    def ensure(self, path: str | Path | bytes) -> Path:
        """The entry's file, computed if missing; nothing is read back (warming the cache)."""
        entry = self.entry(path)
        if not entry.is_file():
            self.get(path)
        else:
            self.hits += 1
        return entry

    @staticmethod
    def read(entry: Path) -> torch.Tensor:
        try:
            return torch.load(entry, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which, in one line
            raise ValueError(f"{entry}: unreadable feature-cache entry "
                             f"({type(error).__name__}); delete it and it is computed again"
                             ) from None

    def _write(self, entry: Path, features: torch.Tensor) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(features, f)
            os.replace(temporary, entry)  # atomic: readers see the whole file or none
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
