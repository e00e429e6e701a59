"""LISA's segmentation data kinds: sem_seg (generic, ADE20K, COCO-Stuff), refer_seg (refcoco's
refs pickle + COCO instances), ReasonSeg's explanatory answers; the restricted unpickler; COCO
mask decoding; read_dataset's folder detection.

Masks are checked against the label PNGs, the painted shapes and hand-computed RLEs; questions
against LISA's templates (utils/utils.py), copied here so that a change to ours is seen.
"""

import json
import os
import pickle
import random
import re
import shutil
import sys
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivlm.constants import IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.coco_masks import (counts_to_string, decode_counts, decode_segmentation,
                                     encode_counts, pixel_outline, polygon_counts,
                                     string_to_counts)
from minivlm.data.lisa_templates import (ANSWER_LIST, EXPLANATORY_QUESTION_LIST,
                                         LONG_QUESTION_LIST, SHORT_QUESTION_LIST, explanatory_mode,
                                         record_rng, sample_indices)
from minivlm.data.masks import decode_masks
from minivlm.data.readers import folder_kind, read_dataset
from minivlm.data.reasonseg import expand_referring_texts, read_reasonseg_dir
from minivlm.data.refer_seg import read_refer_dir
from minivlm.data.safe_pickle import load_plain_pickle, loads_plain_pickle
from minivlm.data.sample import check_sample
from minivlm.data.seg_data_config import SegDataConfig
from minivlm.data.sem_seg import read_ade20k, read_cocostuff, read_sem_seg_dir
from minivlm.data.sem_seg_classes import ADE20K_CLASSES, COCOSTUFF_CLASSES
from minivlm.data.shapes.scene import scene_from_json, shape_mask

# LISA's utils/utils.py, verbatim.
LISA_SHORT = [
    "<image>\nCan you segment the {class_name} in this image?",
    "<image>\nPlease segment the {class_name} in this image.",
    "<image>\nWhat is {class_name} in this image? Please respond with segmentation mask.",
    "<image>\nWhat is {class_name} in this image? Please output segmentation mask."]
LISA_ANSWERS = ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].",
                "Sure, the segmentation result is [SEG].", "[SEG]."]


def asked(question: str, name: str) -> bool:
    return question in [t.format(class_name=name.lower()) for t in LISA_SHORT]


def same(a, b) -> bool:
    return (len(a) == len(b) and all(
        x.turns == y.turns and x.images == y.images and len(x.masks) == len(y.masks)
        and all(np.array_equal(m, n) for m, n in zip(x.masks, y.masks)) for x, y in zip(a, b)))


def test_templates_are_lisas():
    assert list(SHORT_QUESTION_LIST) == LISA_SHORT and list(ANSWER_LIST) == LISA_ANSWERS
    assert LONG_QUESTION_LIST[1] == "<image>\n{sent} Please output segmentation mask."
    assert EXPLANATORY_QUESTION_LIST[0] == "Please output segmentation mask and explain why."
    assert (len(ADE20K_CLASSES), ADE20K_CLASSES[0], ADE20K_CLASSES[-1]) == (150, "wall", "flag")
    assert (len(COCOSTUFF_CLASSES), COCOSTUFF_CLASSES[0], COCOSTUFF_CLASSES[95]) == \
        (182, "person", "building-other")
    # LISA's draw: a random subset in random order when there are enough, else all in order.
    assert sample_indices(random.Random(0), 2, 3) == [0, 1]
    draws = [sample_indices(random.Random(seed), 10, 3) for seed in range(50)]
    assert all(len(set(d)) == 3 and set(d) <= set(range(10)) for d in draws)
    assert any(d != sorted(d) for d in draws)  # random order, as np.random.choice
    counts = Counter(explanatory_mode(record_rng(0, i), 0.1) for i in range(20000))
    assert [round(counts[m] / 20000, 2) for m in (0, 1, 2)] == [0.45, 0.45, 0.1]


# ---------------------------------------------------------------------------- sem_seg
@pytest.fixture
def ade(tmp_path) -> Path:
    """ADEChallengeData2016 with two training images: raw 0 is "other", k is class k - 1."""
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images/training", "annotations/training"):
        (root / sub).mkdir(parents=True)
    raw = np.zeros((6, 8), dtype=np.uint8)
    raw[1:3, 1:4], raw[3:5, 2:7], raw[0, 6:] = 1, 4, 13  # wall, floor, person
    raw[5, 0] = 255
    for name, label in (("a", raw), ("b", np.where(raw == 13, 1, raw).astype(np.uint8))):
        Image.new("RGB", (8, 6), (90, 90, 90)).save(root / "images/training" / f"{name}.jpg")
        Image.fromarray(label, "L").save(root / "annotations/training" / f"{name}.png")
    return root


def test_ade20k_masks_questions_and_conversations(ade):
    raw = np.array(Image.open(ade / "annotations/training/a.png"))
    samples = read_ade20k(ade.parent)  # the folder holding ADEChallengeData2016 works too
    a = [s for s in samples if s.meta["id"] == "a"]
    assert len(a) == 3 and [s.meta["conversation"] for s in a] == [0, 1, 2]
    assert sorted(a[0].meta["classes"]) == ["floor", "person", "wall"]
    for sample, name, class_id in zip(a, a[0].meta["classes"], a[0].meta["class_ids"]):
        check_sample(sample)
        question, answer = (t["content"] for t in sample.turns)
        assert asked(question, name) and answer in LISA_ANSWERS
        assert class_id == ADE20K_CLASSES.index(name) and sample.images == [
            ade / "images/training/a.jpg"]
        expected = np.where((raw == 0) | (raw == 255), 255, raw == class_id + 1)
        assert np.array_equal(sample.masks[0], expected.astype(np.uint8))
    # One multi-turn sample instead: the image once, the same draws, masks in turn order.
    (multi, _) = read_ade20k(ade, SegDataConfig(multi_turn=True))
    check_sample(multi)
    assert [t["content"].count(SEG_TOKEN) for t in multi.turns] == [0, 1] * 3
    assert sum(t["content"].count(IMAGE_TOKEN) for t in multi.turns) == 1
    assert multi.turns[0]["content"] == a[0].turns[0]["content"]
    assert multi.turns[2]["content"] == a[1].turns[0]["content"].removeprefix("<image>\n")
    assert all(np.array_equal(m, s.masks[0]) for m, s in zip(multi.masks, a))
    two = read_ade20k(ade, SegDataConfig(num_classes_per_sample=2, multi_turn=True))
    assert [len(s.masks) for s in two] == [2, 2]  # b has only wall and floor


def test_sem_seg_same_seed_same_samples(shapes_dir):
    folder = shapes_dir / "sem_seg" / "train"
    first, again = read_sem_seg_dir(folder), read_dataset(folder)
    assert same(first, again) and first
    assert not same(first, read_dataset(folder, seg_data=SegDataConfig(seed=1)))


def test_sem_seg_synthetic_world(shapes_dir):
    folder = shapes_dir / "sem_seg" / "train"
    names = (folder / "classes.txt").read_text().split()
    assert names == ["background", "circle", "square", "triangle"]
    samples = read_dataset(folder, seg_data=SegDataConfig(multi_turn=True))
    assert len(samples) == len(list((folder / "images").iterdir()))
    for sample in samples:
        check_sample(sample)
        label = np.array(Image.open(folder / "annotations" / f"{sample.meta['id']}.png"))
        image = np.array(Image.open(sample.images[0]))
        present = set(np.unique(label).tolist())
        assert len(sample.masks) == min(3, len(present))
        for k, class_id in enumerate(sample.meta["class_ids"]):
            question = sample.turns[2 * k]["content"]  # the image placeholder in turn 0 only
            assert asked(question if k == 0 else "<image>\n" + question, names[class_id])
            assert np.array_equal(sample.masks[k], (label == class_id).astype(np.uint8))
        # the label is the picture: background white, every shape pixel coloured
        white = (image == 255).all(axis=-1)
        assert white[label == 0].all() and not white[label > 0].any()


def test_sem_seg_bad_input(shapes_dir, tmp_path):
    folder = tmp_path / "seg"
    shutil.copytree(shapes_dir / "sem_seg" / "train", folder)
    Image.new("L", (10, 10)).save(folder / "annotations" / "000001.png")
    Image.fromarray(np.full((32, 32), 9, np.uint8), "L").save(folder / "annotations/000002.png")
    (folder / "images" / "000003.png").unlink()
    with pytest.raises(ValueError, match=r"000001.png: label is 10x10 but its image 000001.png "
                                         r"is 32x32$"):
        read_sem_seg_dir(folder)
    errors = []
    samples = read_sem_seg_dir(folder, errors=errors)
    assert {s.meta["id"] for s in samples} == {"000000", "000004", "000005"}
    assert "000002.png: label values [9] name no class (4 classes" in errors[1]
    assert errors[2].endswith("000003.png: label has no image (looked for 000003 with suffix "
                              ".jpg or .jpeg or .png)")
    assert all("\n" not in e for e in errors)
    (folder / "classes.txt").unlink()
    with pytest.raises(ValueError, match=r"seg: no class names file \(looked for .*classes.txt "
                                         r"and .*classes.json\)$"):
        read_dataset(f"sem_seg:{folder}")
    with pytest.raises(ValueError, match="cannot tell the dataset kind"):
        read_dataset(folder)  # no classes file: no longer a sem_seg folder


def test_cocostuff_ignores_merged_stuff_classes(tmp_path):
    labels = tmp_path / "stuffthingmaps_trainval2017" / "train2017"
    images = tmp_path / "images" / "train2017"
    labels.mkdir(parents=True), images.mkdir(parents=True)
    index = COCOSTUFF_CLASSES.index
    raw = np.full((4, 5), 255, np.uint8)  # 255: unlabeled
    raw[0, :2], raw[1, :], raw[2:, 3:] = index("person"), index("building-other"), index("grass")
    raw[3, 0] = index("wall-brick")
    Image.fromarray(raw, "L").save(labels / "x.png")
    Image.new("RGB", (5, 4)).save(images / "x.jpg")
    (sample,) = read_dataset(tmp_path, seg_data=SegDataConfig(multi_turn=True))
    assert sample.meta["classes"] == ["person", "grass"]  # the merged "-other" classes: ignore
    person, grass = decode_masks(sample.masks)
    ignore = (raw == 255) | (raw == index("building-other")) | (raw == index("wall-brick"))
    assert np.array_equal(person, np.where(ignore, 255, raw == index("person")).astype(np.uint8))
    assert grass[2:, 3:].min() == 1 and person[1].tolist() == [255] * 5 and grass[3, 0] == 255
    assert read_cocostuff(tmp_path)[0].images == [images / "x.jpg"]


# ---------------------------------------------------------------------------- refer_seg
def test_refer_synthetic_world(shapes_dir):
    folder = shapes_dir / "refer"
    instances = json.loads((folder / "instances.json").read_text())
    images = {image["id"]: image for image in instances["images"]}
    annotations = {ann["id"]: ann for ann in instances["annotations"]}
    refs = load_plain_pickle(folder / "refs(unc).p")
    assert refs == pickle.loads((folder / "refs(unc).p").read_bytes())  # plain data, as written
    for split in ("train", "val", "test"):
        samples = read_dataset(folder, seg_data=SegDataConfig(split=split, multi_turn=True))
        wanted = {r["image_id"] for r in refs if r["split"] == split}
        assert {s.meta["id"] for s in samples} == wanted
        for sample in samples:
            check_sample(sample)
            image = images[sample.meta["id"]]
            scene = {s.name: s for s in scene_from_json(image["scene"])}
            mine = [r for r in refs if r["image_id"] == image["id"]]
            sentences = [(s["sent"], r["ann_id"], r["target"]) for r in mine
                         for s in r["sentences"]]
            assert len(sample.masks) == min(3, len(sentences))
            for k, (sentence, ann_id) in enumerate(zip(sample.meta["sentences"],
                                                       sample.meta["ann_ids"])):
                target = next(t for s, a, t in sentences if s == sentence and a == ann_id)
                question = sample.turns[2 * k]["content"]
                assert asked(question if k == 0 else "<image>\n" + question, sentence)
                polygon = decode_segmentation(annotations[ann_id]["segmentation"], 32, 32)
                assert np.array_equal(sample.masks[k], polygon)
                assert np.array_equal(sample.masks[k], shape_mask(scene[target], 32))
    one_each = read_refer_dir(folder)
    assert all(len(s.masks) == 1 for s in one_each) and same(one_each, read_refer_dir(folder))
    assert not same(one_each, read_refer_dir(folder, SegDataConfig(seed=5)))


def test_refer_bad_ann_id_and_sizes(shapes_dir, tmp_path):
    folder = tmp_path / "refcoco"
    shutil.copytree(shapes_dir / "refer", folder)
    refs = load_plain_pickle(folder / "refs(unc).p")
    refs[0]["ann_id"] = 9999
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    where = f"{folder / 'refs(unc).p'}: ref {refs[0]['ref_id']} (image {refs[0]['image_id']})"
    with pytest.raises(ValueError, match=rf"^{re.escape(where)}: ann_id 9999 is "
                                         rf"not in .*instances.json$"):
        read_refer_dir(folder)
    errors = []
    samples = read_refer_dir(folder, errors=errors)
    assert len(errors) == 1 and refs[0]["image_id"] not in {s.meta["id"] for s in samples}
    val = next(r for r in refs if r["split"] == "val")
    Image.new("RGB", (20, 32)).save(folder / "images" / val["file_name"])
    with pytest.raises(ValueError, match=rf"{val['file_name']} is 20x32 but instances.json says "
                                         r"32x32$"):
        read_refer_dir(folder, SegDataConfig(split="val"))
    with pytest.raises(ValueError, match=r"no ref in split 'testA' \(splits there: "
                                         r"\['test', 'train', 'val'\]\)"):
        read_refer_dir(folder, SegDataConfig(split="testA"))


# ---------------------------------------------------------------------------- pickles
class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unpickler_reads_plain_data_and_refuses_any_class(tmp_path):
    plain = [{"ref_id": 1, "sentences": [{"sent": "man", "tokens": ["man"]}], "box": (1.5, None),
              "ok": True, "area": 2 ** 70}]
    for protocol in (0, 2, 5):
        assert loads_plain_pickle(pickle.dumps(plain, protocol=protocol)) == plain
    assert loads_plain_pickle(b"\x80\x02U\x03man.") == "man"  # a Python 2 str: text
    path = tmp_path / "refs(unc).p"
    dummy = "minivlm_dummy_never_imported"
    crafted = {
        "collections.OrderedDict": pickle.dumps(OrderedDict(a=1)),
        "posix.system": pickle.dumps(Evil(), protocol=0),
        f"{dummy}.thing": f"c{dummy}\nthing\n)R.".encode(),  # GLOBAL, then call it
        f"{dummy}.other": (b"\x80\x04\x8c" + bytes([len(dummy)]) + dummy.encode()  # STACK_GLOBAL
                           + b"\x8c\x05other\x93)R."),
        f"{dummy}.made": f"(i{dummy}\nmade\n.".encode(),  # INST
    }
    for name, data in crafted.items():
        path.write_bytes(data)
        with pytest.raises(ValueError) as caught:
            load_plain_pickle(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: the pickle names {name}; only plain") and \
            "\n" not in message
    assert dummy not in sys.modules and not (Path.cwd() / "pwned").exists()
    path.write_bytes(b"\x80\x02]q\x00(K\x01")  # truncated
    with pytest.raises(ValueError, match=r"refs\(unc\).p: not a readable pickle"):
        load_plain_pickle(path)
    with pytest.raises(ValueError, match="persistent object"):
        loads_plain_pickle(b"P1\n.")


# ---------------------------------------------------------------------------- COCO masks
def test_rle_round_trip_on_a_hand_computed_rectangle():
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 1:4] = 1  # rows 1-2, columns 1-3
    # Column by column: 0000 0110 0110 0110 0000.
    assert encode_counts(mask) == [5, 2, 2, 2, 2, 2, 5]
    # Deltas from the fourth count on (2-2, 2-2, 2-2, 5-2), one character each: 48 + value.
    assert counts_to_string([5, 2, 2, 2, 2, 2, 5]) == "5220003"
    assert string_to_counts("5220003") == [5, 2, 2, 2, 2, 2, 5]
    for segmentation in ({"size": [4, 5], "counts": "5220003"},
                         {"size": [4, 5], "counts": [5, 2, 2, 2, 2, 2, 5]},
                         [{"size": [4, 5], "counts": b"5220003"}],
                         [[1, 1, 4, 1, 4, 3, 1, 3]]):  # a polygon along the pixel edges
        assert np.array_equal(decode_segmentation(segmentation, 4, 5), mask)
    assert decode_segmentation([], 4, 5).sum() == 0  # LISA: no segmentation, empty mask
    big = np.zeros((300, 200), np.uint8)
    big[7:250, 3:190] = 1  # long runs: multi-character counts, negative deltas
    counts = encode_counts(big)
    assert string_to_counts(counts_to_string(counts)) == counts
    assert np.array_equal(decode_counts(counts, 300, 200), big)
    assert np.array_equal(decode_counts(polygon_counts(pixel_outline(big), 300, 200), 300, 200),
                          big)
    with pytest.raises(ValueError, match=r"ann 3: RLE 'size' \[5, 4\] does not match"):
        decode_segmentation({"size": [5, 4], "counts": "5220003"}, 4, 5, "ann 3")
    with pytest.raises(ValueError, match=r"segmentation\[0\]: polygon with 4 coordinate"):
        decode_segmentation([[1, 1, 2, 2]], 4, 5, "ann 3")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own, under numpy 2
def test_polygons_match_pycocotools_when_installed():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = random.Random(0)
    for _ in range(200):
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        polygon = [rng.uniform(-3, d + 3) for _ in range(rng.randint(3, 9)) for d in (w, h)]
        reference = mask_api.decode(mask_api.frPyObjects([polygon], h, w))[:, :, 0]
        assert np.array_equal(decode_segmentation([polygon], h, w), reference)


# ---------------------------------------------------------------------------- ReasonSeg
@pytest.fixture
def explained(shapes_dir, tmp_path) -> tuple[Path, Path, dict]:
    folder = tmp_path / "ReasonSeg" / "train"
    shutil.copytree(shapes_dir / "reasonseg" / "train", folder)
    names = sorted(p.name for p in folder.glob("*.jpg"))[:-1]  # the last has no explanation
    explanations = {n: f"Because {n} shows it." for n in names}
    path = tmp_path / "ReasonSeg" / "explanatory" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"image": n, "query": "q", "outputs": e, "json": n[:-4] + ".json"}
                                for n, e in explanations.items()]))
    return folder, path, explanations


def test_explanatory_modes(explained):
    folder, path, explanations = explained
    plain = read_reasonseg_dir(folder)
    assert same(read_dataset(folder, seg_data=SegDataConfig()), plain)  # no file: unchanged
    always = read_dataset(folder, seg_data=SegDataConfig(explanatory_file=str(path),
                                                         explanatory=1.0))
    for before, after in zip(plain, always):
        check_sample(after)
        explanation = explanations.get(before.images[0].name)
        if explanation is None:
            assert same([after], [before]) and "explanatory_mode" not in after.meta
            continue
        assert after.meta["explanatory_mode"] == 2 and after.masks == []
        assert after.turns == [{"role": "user", "content": "<image>\n" + before.meta["texts"][0]},
                               {"role": "assistant", "content": explanation}]
    never = read_reasonseg_dir(folder, seg_data=SegDataConfig(explanatory_file=str(path),
                                                              explanatory=0.0))
    modes = Counter()
    for before, after in zip(plain, never):
        check_sample(after)
        explanation = explanations.get(before.images[0].name)
        if explanation is None:
            continue
        modes[after.meta["explanatory_mode"]] += 1
        assert np.array_equal(after.masks[0], before.masks[0])
        if after.meta["explanatory_mode"] == 0:
            assert after.turns == before.turns
        else:
            assert after.turns[0]["content"] in [f"<image>\n{before.meta['texts'][0]} {q}"
                                                 for q in EXPLANATORY_QUESTION_LIST]
            assert after.turns[1]["content"] == f"{before.turns[1]['content']} {explanation}"
    assert set(modes) == {0, 1}
    # Every referring text, each in its mode's question form.
    for sample in expand_referring_texts(never):
        if sample.meta.get("explanatory_mode") == 1:
            assert any(sample.turns[0]["content"] == f"<image>\n{t} {q}"
                       for t in sample.meta["texts"] for q in EXPLANATORY_QUESTION_LIST)
    same_again = read_reasonseg_dir(folder, seg_data=SegDataConfig(explanatory_file=str(path),
                                                                   explanatory=0.0))
    assert same(never, same_again)
    path.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(ValueError, match=r"train.json:0: missing key 'outputs'$"):
        read_reasonseg_dir(folder, seg_data=SegDataConfig(explanatory_file=str(path)))


# ---------------------------------------------------------------------------- detection
def test_read_dataset_names_each_kind(shapes_dir, ade, tmp_path):
    assert folder_kind(shapes_dir / "refer") == "refer_seg"
    assert folder_kind(shapes_dir / "sem_seg" / "val") == "sem_seg"
    assert folder_kind(shapes_dir / "reasonseg" / "val") == "reasonseg"
    assert folder_kind(ade) == folder_kind(ade.parent) == "ade20k"
    assert same(read_dataset(f"ade20k:{ade}"), read_dataset(ade))
    assert same(read_dataset(f"reasonseg:{shapes_dir / 'reasonseg' / 'val'}"),
                read_reasonseg_dir(shapes_dir / "reasonseg" / "val"))
    with pytest.raises(ValueError, match=r"nowhere: not a directory \(expected a refer_seg "
                                         r"folder: refs\(\*\).p"):
        read_dataset("refer_seg:nowhere")
    with pytest.raises(ValueError, match=r"cannot tell the dataset kind from the folder; looked "
                                         r"for refs\(\*\).p .*\(reasonseg\). Or name it"):
        (tmp_path / "empty").mkdir()
        read_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="SegDataConfig.split must be one of train"):
        replace(SegDataConfig(), split="training")
