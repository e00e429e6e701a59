"""--skip-bad for what fails only when an item is decoded: a truncated image body, a damaged label.

Everything else is found when the dataset is built, before the first step. An image whose header
reads but whose pixels do not (a file cut short after its header) is found only by decoding it,
which the DataLoader's workers do. Such an item is replaced by a stand-in that does not depend on
the number of workers or on which worker meets it: the next example, in index order and wrapping
around, that decodes and is no longer (so that a packed row still fits its max_seq_len). Every
epoch and every run therefore trains the same examples, and `--resume` stays exact.

The process that meets it, the main one or a DataLoader worker, appends it to skipped.jsonl
itself (under a file lock, once per record and reason) and prints one line. A worker has no
channel back to the trainer that survives collate and packing, and skipped.jsonl is where every
skipped record is looked for.
"""
from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path

import numpy as np

from minivlm.data.skipped import skipped_record


MAX_STAND_IN_TRIES = 64  # past that, something is wrong with the data as a whole: say so


def stand_in_order(index: int, lengths: np.ndarray) -> np.ndarray:
    """The examples that may replace example `index`, in the order they are tried: those no
    longer than it, from index + 1 on, wrapping around (at most MAX_STAND_IN_TRIES)."""
    fits = np.flatnonzero(lengths <= lengths[index])
    return np.concatenate([fits[fits > index], fits[fits < index]])[:MAX_STAND_IN_TRIES]


def record_late_skip(log: Path | None, data: str, message: str, stand_in: str) -> None:
    """Append one skipped record ({"data", "file", "index", "reason", "replaced_by"}) to `log`
    and say so on stderr, unless the same record with the same reason is there already (the
    next epoch meets it again)."""
    if log is not None:
        record = dict(skipped_record(data, message), replaced_by=stand_in)
        key = (record["file"], record["index"], record["reason"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # workers and DDP ranks append to one file
            f.seek(0)
            if any(key == (seen["file"], seen["index"], seen["reason"])
                   for seen in map(json.loads, f)):
                return
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"skipped at decode time: {message} (replaced by {stand_in})", file=sys.stderr)
