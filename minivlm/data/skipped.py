"""What `--skip-bad` left out: every skipped record, and how many were skipped for what.

Readers and ChatDataset report a bad record as one line "location: reason" (readers.py's rule),
the location being "file.json:17" (entry 17), "file.jsonl:17" (line 17) or a ReasonSeg
"folder/NAME.json". Here each line becomes {"data", "file", "index", "reason"} for
`skipped.jsonl`, and the reasons are grouped into kinds for the console: "image '…' not found"
counted once, not listed once per missing file.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from minivlm.files import write_text_atomic

SHOWN_KINDS = 8  # kinds of reason printed; skipped.jsonl always has every record


def skipped_record(data_path: str, message: str) -> dict:
    location, _, reason = message.partition(": ")
    file, _, index = location.rpartition(":")
    if not index.isdigit():  # a ReasonSeg record: the annotation file is the location
        file, index = location, None
    return {"data": data_path, "file": file, "index": None if index is None else int(index),
            "reason": reason}


def reason_kind(reason: str) -> str:
    """The reason without what varies from record to record: the nested locations in front
    ("images/x.png: file not found"), details in parentheses, file names and numbers."""
    while (nested := re.match(r"\S+: ", reason)) is not None:
        reason = reason[nested.end():]
    reason = re.sub(r" \([^()]*\)", "", reason)
    # 'x.jpg' varies from record to record; 'messages' names a key and stays
    reason = re.sub(r"'([^']*)'", lambda m: m[0] if re.fullmatch(r"\w+", m[1]) else "'…'", reason)
    return re.sub(r"\d+", "N", reason)


def skip_summary(records: list[dict]) -> str:
    """One line per kind of reason, the most frequent first."""
    kinds = Counter(reason_kind(r["reason"]) for r in records).most_common()
    lines = [f"  {count:6d} x {kind}" for kind, count in kinds[:SHOWN_KINDS]]
    if len(kinds) > SHOWN_KINDS:
        rest = sum(count for _, count in kinds[SHOWN_KINDS:])
        lines.append(f"  {rest:6d} x {len(kinds) - SHOWN_KINDS} other kinds of reason")
    return "\n".join(lines)


def write_skipped(path: str | Path, records: list[dict]) -> None:
    """All skipped records as JSON lines (an empty file when none was: no stale list remains)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
