"""Which files one SFT record's route runs through: regenerates the README's "Follow a batch" list.

    .venv/bin/python scripts/follow_a_batch.py

Runs `train_sft.py` for one step on one record of the quick synthetic world (a fresh demo-quick
model, one process, no workers), with a profile hook that notes every minivlm/ or top-level file
a Python function is called in, in the order first called. Files are counted, not functions: a
file a reader has to open once is one file, however often the route returns to it. Two groups:
  set-up  called before the first training step (reading the data, building the model)
  step    called from the first training step on (the batch's own route to the loss)
Checkpoint saving and results at the end of the run are left out (they are not the route).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_sft  # noqa: E402
from minivlm.data.shapes.config import ShapesConfig  # noqa: E402
from minivlm.data.shapes.generate import generate  # noqa: E402
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece  # noqa: E402
from minivlm.train_tokenizer import dataset_texts  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="follow_a_batch_"))
    generate(work / "shapes", seed=0, config=ShapesConfig.quick())
    records = json.loads((work / "shapes" / "sft.json").read_text())
    (work / "shapes" / "one.json").write_text(json.dumps(records[:1]))
    train_sentencepiece(dataset_texts([str(work / "shapes" / "sft.json")]) * 4, work / "tok",
                        vocab_size=360)
    seen: dict[str, str] = {}
    phase = ["set-up"]
    saving = {"save", "_save", "write_results", "save_checkpoint"}

    def profile(frame, event, _arg):
        if event != "call":
            return
        name = frame.f_code.co_name
        if name in ("_loader", "_batches", "training_loader"):
            phase[0] = "step"
        if name in saving:
            phase[0] = "end"
        path = Path(frame.f_code.co_filename)
        if phase[0] == "end" or REPO not in path.parents or ".venv" in path.parts:
            return
        relative = str(path.relative_to(REPO))
        if relative.startswith("scripts/"):
            return
        seen.setdefault(relative, phase[0])

    sys.setprofile(profile)
    try:
        train_sft.main(["--tokenizer", str(work / "tok"), "--out-dir", str(work / "run"),
                        "--data", str(work / "shapes" / "one.json"),
                        "--max-steps", "1", "--batch-size", "1",
                        "--model-preset", "demo-quick", "--warmup-steps", "1",
                        "--num-workers", "0", "--data-index-cache", "off"])
    finally:
        sys.setprofile(None)
    for group in ("set-up", "step"):
        files = [f for f, g in seen.items() if g == group]
        print(f"{group}: {len(files)} files")
        for file in files:
            print(f"  {file}")
    print(f"all: {len(seen)} files")


if __name__ == "__main__":
    main()
