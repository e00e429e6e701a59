"""Readers: the real Chiron-o1 fixtures, placeholder rules, ReasonSeg masks, and error
locations."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivlm.constants import FINAL_ANSWER_PREFIX, IMAGE_TOKEN
from minivlm.data.readers import (read_chiron_eval, read_dataset, read_llava_json,
                                  read_messages_jsonl)
from minivlm.data.masks import decode_mask
from minivlm.data.reasonseg import LabelmeMask, expand_referring_texts, read_reasonseg_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def placeholders(sample) -> int:
    return sum(t["content"].count(IMAGE_TOKEN) for t in sample.turns)


def test_chiron_eval_fixture_all_items():
    path = FIXTURES / "chiron_o1_eval" / "eval_data.json"
    records = json.loads(path.read_text())
    samples = read_chiron_eval(path)
    assert len(samples) == len(records) == 10
    for index, (sample, record) in enumerate(zip(samples, records)):
        names = record["img_name"] if isinstance(record["img_name"], list) else [record["img_name"]]
        assert sample.images == [path.parent / name for name in names]
        assert all(p.is_file() for p in sample.images)
        assert placeholders(sample) == len(sample.images) == record["question"].count(IMAGE_TOKEN)
        assert sample.turns[0] == {"role": "user", "content": record["question"]}
        assert sample.turns[1]["role"] == "assistant"
        assert sample.turns[1]["content"] == (record["reasoning"] + "\n" + FINAL_ANSWER_PREFIX
                                              + record["answer"])
        assert {k: sample.meta[k] for k in ("id", "answer", "answer_type", "reasoning")} == \
            {k: record[k] for k in ("id", "answer", "answer_type", "reasoning")}
        assert sample.meta["img_name"] == names and sample.meta["task"] == "vqa"
        assert sample.source == f"{path}:{index}"
    assert len(samples[7].images) == 1  # img_name given as a plain string
    assert [len(s.images) for s in samples] == [5, 4, 4, 4, 5, 2, 2, 1, 2, 2]


def test_messages_fixture_gets_placeholders_and_finds_images_under_images():
    path = FIXTURES / "chiron_o1_demo" / "demo.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = read_messages_jsonl(path)
    assert len(samples) == len(records) == 10
    for line_number, (sample, record) in enumerate(zip(samples, records), start=1):
        # Found in the second place looked: image_dir/images/.
        assert sample.images == [path.parent / "images" / name for name in record["images"]]
        count = len(record["images"])
        assert placeholders(sample) == count and count in (1, 2)
        assert sample.turns[0]["content"] == ((IMAGE_TOKEN + "\n") * count
                                              + record["messages"][0]["content"])
        assert sample.turns[1] == record["messages"][1]
        assert sample.meta["rid"] == record["rid"] and sample.source == f"{path}:{line_number}"
    assert read_dataset(path)[3].turns == samples[3].turns


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def pictures(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    return tmp_path


def test_llava_roles_placeholders_and_extra_keys(pictures):
    path = write_json(pictures / "data.json", [
        {"id": "x", "image": "a.png", "question_type": "count",
         "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                           {"from": "gpt", "value": "2"}]},
        {"id": "y", "image": ["a.png", "b.png"],
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "Compare."},
                           {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"},
                           {"from": "gpt", "value": "Yes."}]},
        {"id": "z", "conversations": [{"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello"}]},
    ])
    first, second, text_only = read_llava_json(path)
    assert first.turns == [{"role": "user", "content": "<image>\nHow many?"},
                           {"role": "assistant", "content": "2"}]
    assert first.images == [pictures / "a.png"] and first.meta["question_type"] == "count"
    assert second.images == [pictures / "a.png", pictures / "b.png"]
    assert [t["role"] for t in second.turns] == ["system", "user", "assistant", "user", "assistant"]
    # The first *user* turn, not the system turn.
    assert second.turns[1]["content"] == "<image>\n<image>\nCompare."
    assert text_only.images == [] and placeholders(text_only) == 0


def test_image_dir_argument(pictures, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("json")
    path = write_json(elsewhere / "d.json", [{"image": "b.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]}])
    assert read_llava_json(path, image_dir=pictures)[0].images == [pictures / "b.png"]


def test_errors_name_file_and_record(pictures):
    turn_pair = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "ok"}]
    path = write_json(pictures / "bad.json", [
        {"image": ["a.png", "b.png"], "conversations": turn_pair},  # fine
        {"image": "a.png", "conversations": turn_pair},  # 2 placeholders, 1 image
        {"image": ["a.png", "nope.png"], "conversations": turn_pair},  # missing file
        {"image": "a.png"},  # no conversations
        {"image": "a.png", "conversations": [{"from": "robot", "value": "<image>"}]},
        {"image": ["a.png", "b.png"],
         "conversations": turn_pair[:1] + [{"from": "gpt", "value": "[SEG]"}]},
    ])
    with pytest.raises(ValueError, match=f"^{path}:1: 2 <image> placeholder\\(s\\) in the text "
                                         "but 1 image\\(s\\)"):
        read_llava_json(path)
    errors = []
    samples = read_llava_json(path, errors=errors)
    assert len(samples) == 1 and len(errors) == 5
    assert [e.split(": ")[0] for e in errors] == [f"{path}:{i}" for i in range(1, 6)]
    assert "image 'nope.png' not found" in errors[1]
    assert "missing key 'conversations'" in errors[2]
    assert "'from' should be one of" in errors[3]
    assert "1 [SEG] in the answer(s) but 0 mask(s)" in errors[4]
    assert all("\n" not in e for e in errors)


def test_messages_jsonl_line_numbers_and_bad_json(pictures):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "images": ["a.png"]}
    mismatch = {"messages": [{"role": "user", "content": "<image> Q"},
                             {"role": "assistant", "content": "A"}],
                "images": ["a.png", "b.png"]}
    path = pictures / "m.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps(mismatch) + "\n")
    errors = []
    samples = read_messages_jsonl(path, errors=errors)
    assert len(samples) == 1 and samples[0].turns[0]["content"] == "<image>\nQ"
    # Line 3: editors' numbering, the blank line counted.
    assert errors[0].startswith(f"{path}:3: invalid JSON")
    assert errors[1] == f"{path}:4: 1 <image> placeholder(s) in the text but 2 image(s) listed"


def test_read_dataset_picks_the_format(pictures):
    llava = write_json(pictures / "l.json", [{"image": "a.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    chiron = write_json(pictures / "c.json", [{"id": 1, "img_name": "a.png",
                                               "question": "<image>\nQ?", "reasoning": "",
                                               "answer": "A", "answer_type": "CLOSED"}])
    assert read_dataset(llava)[0].turns[0]["content"] == "<image>\nhi"
    sample = read_dataset(chiron)[0]
    # No reasoning: no leading newline.
    assert sample.turns[1]["content"] == FINAL_ANSWER_PREFIX + "A"
    assert sample.meta["answer_type"] == "CLOSED"
    unknown = write_json(pictures / "u.json", [{"foo": 1}])
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_dataset(unknown)


# ---------------------------------------------------------------------------- ReasonSeg
def write_reasonseg(folder: Path, name: str, shapes: list, size=(40, 30), text=("the thing",),
                    is_sentence=False):
    Image.new("RGB", size, (90, 90, 90)).save(folder / f"{name}.jpg", quality=95)
    write_json(folder / f"{name}.json",
               {"text": list(text), "is_sentence": is_sentence, "shapes": shapes})


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_reasonseg_mask_ignore_flag_and_clipping(tmp_path):
    write_reasonseg(tmp_path, "a", [
        {"label": "flag", "points": square(0, 0, 39, 29)},  # deprecated annotation: skipped
        {"label": "target", "points": square(5, 5, 20, 20)},
        {"label": "ignore", "points": square(10, 10, 14, 14)},  # smaller: drawn over the target
        # Off the right and bottom edges: clipped.
        {"label": "target", "points": square(30.7, 20.2, 60, 50)},
    ], text=("the dark square", "that grey box"))
    write_reasonseg(tmp_path, "b", [
        # Larger: drawn first, the target on top.
        {"label": "Ignore region", "points": square(0, 0, 39, 29)},
        {"label": "target", "points": square(10, 10, 12, 12)},
    ], text=("What should be cut out?",), is_sentence=True)
    first, second = read_reasonseg_dir(tmp_path)
    # Kept as the polygons until an item needs the mask (data/masks.py), then drawn.
    assert isinstance(first.masks[0], LabelmeMask) and first.masks[0].shape == (30, 40)
    mask = decode_mask(first.masks[0])
    assert mask.shape == (30, 40) and mask.dtype == np.uint8
    assert (mask[7, 7], mask[12, 12], mask[5, 20], mask[25, 8], mask[2, 35]) == (1, 255, 1, 0, 0)
    assert mask[10:15, 10:15].tolist() == [[255] * 5] * 5
    # x 30.7 -> 30, y 20.2 -> 20 (truncated).
    assert mask[20:, 30:].min() == 1 and mask[19, 30] == 0
    assert first.images == [tmp_path / "a.jpg"] and first.source == f"{tmp_path / 'a.json'}"
    assert first.turns == [
        {"role": "user", "content": "<image>\nWhat is the dark square in this image? "
                                    "Please output segmentation mask."},
        {"role": "assistant", "content": "Sure, it is [SEG]."}]
    assert (first.meta["texts"] == ["the dark square", "that grey box"]
            and first.meta["task"] == "reason_seg")

    mask = decode_mask(second.masks[0])
    assert (mask[11, 11] == 1 and mask[0, 0] == 255 and mask[9, 9] == 255
            and set(np.unique(mask)) == {1, 255})
    assert second.turns[0]["content"] == ("<image>\nWhat should be cut out? "
                                          "Please output segmentation mask.")


def test_reasonseg_errors(tmp_path):
    write_reasonseg(tmp_path, "a_two_points", [{"label": "target", "points": [[1, 1], [5, 5]]}])
    write_reasonseg(tmp_path, "b_outside",
                    [{"label": "target", "points": square(100, 100, 120, 120)}])
    write_reasonseg(tmp_path, "c_only_ignore",
                    [{"label": "ignore", "points": square(1, 1, 5, 5)}])
    write_reasonseg(tmp_path, "d_good", [{"label": "target", "points": square(1, 1, 5, 5)}])
    Image.new("RGB", (8, 8)).save(tmp_path / "e_no_json.jpg")
    write_json(tmp_path / "f_no_text.json", {"shapes": [], "is_sentence": False})
    Image.new("RGB", (8, 8)).save(tmp_path / "f_no_text.jpg")
    with pytest.raises(ValueError,
                       match=r"a_two_points.json: shapes\[0\] \('target'\): polygon with 2 point"):
        read_reasonseg_dir(tmp_path)
    errors = []
    samples = read_reasonseg_dir(tmp_path, errors=errors)
    assert [s.meta["id"] for s in samples] == ["d_good"]
    assert "covers no pixel of the 40x30 image" in errors[1] and "b_outside.json" in errors[1]
    assert "no target polygon" in errors[2]
    assert "e_no_json.jpg has no annotation file e_no_json.json" in errors[3]
    assert errors[4].endswith("f_no_text.json: missing key 'text'")


def test_reasonseg_answer_extension_and_text_expansion(tmp_path):
    write_reasonseg(tmp_path, "a", [{"label": "target", "points": square(2, 2, 10, 10)}],
                    text=("the red one", "the left-most shape", "the square"))
    annotation = json.loads((tmp_path / "a.json").read_text())
    annotation["answer"] = "Sure, it is the red square [SEG]."
    (tmp_path / "a.json").write_text(json.dumps(annotation))
    (sample,) = read_reasonseg_dir(tmp_path)
    assert sample.turns[-1]["content"] == "Sure, it is the red square [SEG]."
    assert "answer" not in sample.meta
    expanded = expand_referring_texts([sample])
    assert [s.turns[0]["content"] for s in expanded] == [
        "<image>\nWhat is the red one in this image? Please output segmentation mask.",
        "<image>\nWhat is the left-most shape in this image? Please output segmentation mask.",
        "<image>\nWhat is the square in this image? Please output segmentation mask."]
    assert all(s.masks[0] is sample.masks[0] and s.turns[1:] == sample.turns[1:] for s in expanded)
    annotation["answer"] = "[SEG] and [SEG]"
    (tmp_path / "a.json").write_text(json.dumps(annotation))
    with pytest.raises(ValueError, match=r"a.json: 'answer' must contain exactly one \[SEG\]"):
        read_reasonseg_dir(tmp_path)
