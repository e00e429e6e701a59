"""The main job runs end to end at a minimal size, and chat writes masks for [SEG] answers."""
import json

import numpy as np
from PIL import Image

from minivlm import chat
from minivlm.eval.inference import mask_overlay


def test_demo_quick_runs_every_stage_and_writes_results(quick_demo):
    tmp_path, results = quick_demo
    assert list(results["seconds"]) == ["data", "tokenizer", "pretrain", "sft", "seg",
                                        "eval_vqa", "eval_seg"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["vqa"]["num_items"] == 8 and saved["seg"]["num_items"] == 3
    assert 0.0 <= saved["seg"]["giou"] <= 1.0
    assert "held-out closed accuracy" in (tmp_path / "results.txt").read_text()
    assert sorted(p.suffix for p in (tmp_path / "examples").iterdir())[0] == ".png"
    # Chat on the trained checkpoint: a forced [SEG] answer gets a mask and an overlay on disk.
    image = next((tmp_path / "data" / "reasonseg" / "test").glob("*.jpg"))
    session = chat.VLMChat(str(tmp_path / "runs" / "seg"), "cpu", str(image), 4)
    answer, masks = session.ask("Which shape is a square? Please output segmentation mask.")
    assert isinstance(answer, str) and session.turns[-1]["content"] == answer


def test_chat_overlay_paints_only_the_mask():
    image = Image.new("RGB", (4, 4), (0, 0, 255))
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 2] = 1
    out = np.asarray(mask_overlay(image, mask, alpha=0.5))
    assert tuple(out[1, 2]) == (127, 0, 127) and tuple(out[0, 0]) == (0, 0, 255)
