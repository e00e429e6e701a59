"""A data file read and tokenised once, kept on disk, and memory-mapped by every later run.

Reading a large LLaVA file is mostly tokenising it (record_encoder.py); nothing of that changes
until the file, its images or the tokenizer do. So the RecordStore of a JSON / JSONL file is saved
under a key of everything it depends on, and the next run with the same key maps its arrays from
disk (shared by the DataLoader's workers and by the ranks of one machine through the page cache):

    key = sha256(INDEX_VERSION, the file's resolved path + size + mtime, image_dir, the
                 tokenizer's saved files, max_seq_len, tokens per tile, image size and tiling,
                 max_image_pixels)
    ROOT/<key[:2]>/<key>/   meta.json (errors, task names) + one .npy per array
An edited file has another size or mtime, hence another key: it is read again, a stale index is
never served. The images are checked too: each has its size and mtime recorded, and an index
whose images changed is built again. The bad records found when it was built are kept with it,
so --skip-bad reports them again (and a run without --skip-bad stops at the first). Entries are
written into a temporary folder and renamed into place, so several ranks may build the same one.

Folders (ReasonSeg, sem_seg, refer_seg) are not indexed: their masks are Python objects, and
they are small. Neither are files under INDEX_MIN_BYTES: reading them is quick anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minivlm.data.feature_cache import default_cache_root
from minivlm.data.record_store import BYTES, ImageTable, RecordStore, StringTable

INDEX_VERSION = 1  # bump when what a store holds, or how records are encoded, changes
INDEX_MIN_BYTES = 1 << 20
ARRAYS = ("token_ids", "trained", "token_offsets", "lengths", "image_refs", "image_offsets",
          "tasks")
IMAGE_ARRAYS = ("kinds", "widths", "heights", "tiles")


def default_index_root() -> Path:
    """Beside the feature cache: $MINIVLM_CACHE/data_index, else ~/.cache/minivlm/data_index."""
    return default_cache_root().parent / "data_index"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the files `tokenizer.save` writes: the same vocabulary, template and special
    tokens give the same fingerprint, whichever object or directory they came from."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        for path in sorted(Path(folder).iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def index_key(path: Path, settings: dict) -> str:
    """The key of `path` read with `settings` (everything else the records depend on)."""
    stat = path.stat()
    identity = {"version": INDEX_VERSION, "file": str(path.resolve()), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, **settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def indexable(path: Path, min_bytes: int = INDEX_MIN_BYTES) -> bool:
    return path.is_file() and path.suffix in (".json", ".jsonl") and \
        path.stat().st_size >= min_bytes


def _image_stats(table: ImageTable) -> np.ndarray:
    """(M, 2) int64: each image file's size and mtime_ns (-1, -1 when it is gone)."""
    stats = np.full((len(table), 2), -1, dtype=np.int64)
    for row in range(len(table)):
        try:
            stat = os.stat(table.source(row))
        except OSError:
            continue
        stats[row] = stat.st_size, stat.st_mtime_ns
    return stats


def save_index(folder: Path, store: RecordStore, errors: list[str]) -> bool:
    """Write `store` as the entry `folder` (atomically); False when it cannot be indexed (masks
    or images given as bytes)."""
    if store.masks or (store.images.kinds == BYTES).any():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        for name in ARRAYS:
            np.save(building / f"{name}.npy", getattr(store, name))
        for name in IMAGE_ARRAYS:
            np.save(building / f"image_{name}.npy", getattr(store.images, name))
        for name, table in (("sources", store.sources), ("image_sources", store.images.sources)):
            np.save(building / f"{name}_blob.npy", table.blob)
            np.save(building / f"{name}_offsets.npy", table.offsets)
        np.save(building / "image_stats.npy", _image_stats(store.images))
        (building / "meta.json").write_text(json.dumps(
            {"errors": errors, "task_names": store.task_names}, ensure_ascii=False))
        try:
            os.rename(building, folder)  # atomic; another rank may have been first
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return True


def load_index(folder: Path) -> tuple[RecordStore, list[str]] | None:
    """The entry's store (its arrays memory-mapped) and errors; None when there is none, or its
    images changed since it was built."""
    if not (folder / "meta.json").is_file():
        return None
    try:
        def array(name: str) -> np.ndarray:
            try:
                return np.load(folder / f"{name}.npy", mmap_mode="r")
            except ValueError:  # numpy cannot map an empty array: load it
                return np.load(folder / f"{name}.npy")

        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        images = ImageTable(StringTable(array("image_sources_blob"),
                                        array("image_sources_offsets")),
                            *(array(f"image_{name}") for name in IMAGE_ARRAYS))
        if not np.array_equal(_image_stats(images), array("image_stats")):
            return None
        store = RecordStore(**{name: array(name) for name in ARRAYS}, images=images,
                            sources=StringTable(array("sources_blob"), array("sources_offsets")),
                            task_names=meta["task_names"])
    except (OSError, ValueError, KeyError):  # a damaged entry is built again, not trusted
        return None
    return store, meta["errors"]
