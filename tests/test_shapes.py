"""The synthetic shapes world: deterministic, split by content, every answer true to the picture.

The answer checks re-derive each answer from the stored ground-truth scene with logic written
here, independently of data/shapes/questions.py, and the scenes are checked against the pixels.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivlm.data.masks import decode_mask
from minivlm.data.readers import read_chiron_eval, read_dataset, read_llava_json, read_reasonseg_dir
from minivlm.data.sample import check_sample
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.generate import generate, main
from minivlm.data.shapes.questions import answer_space
from minivlm.data.shapes.stats import population_answers
from minivlm.data.shapes.scene import (BACKGROUND, COLOURS, SPLIT_PERCENT, describe_scene,
                                       scene_from_json, scene_key, shape_mask, split_of)

CONFIG = ShapesConfig.quick()
SIZE = CONFIG.image_size
MARGIN = SIZE / 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("shapes") / "out", seed=0, config=CONFIG)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    root = dataset["meta"].parent
    again = generate(tmp_path / "again", seed=0, config=CONFIG)["meta"].parent
    other = generate(tmp_path / "other", seed=1, config=CONFIG)["meta"].parent
    assert all_files(root) == all_files(again)
    assert all_files(root).keys() == all_files(other).keys()
    assert all_files(root)["eval.json"] != all_files(other)["eval.json"]


def test_cached_when_unchanged_and_refuses_foreign_folders(dataset, tmp_path):
    before = dataset["meta"].stat().st_mtime_ns
    assert generate(dataset["meta"].parent, seed=0, config=CONFIG) == dataset
    assert dataset["meta"].stat().st_mtime_ns == before
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path, seed=0, config=CONFIG)


def test_readers_load_every_file_with_configured_counts(dataset):
    meta = json.loads(dataset["meta"].read_text())
    assert len(read_llava_json(dataset["pretrain"])) == CONFIG.num_train_images
    sft = read_dataset(dataset["sft"])
    assert (len(sft) == CONFIG.num_train_images + CONFIG.num_train_pairs
            == meta["counts"]["sft_records"])
    assert sum(len(s.meta["question_types"]) for s in sft) == meta["counts"]["sft_questions"]
    assert len(read_chiron_eval(dataset["val"])) == CONFIG.num_val
    assert len(read_chiron_eval(dataset["eval"])) == CONFIG.num_test
    for split, count in (("train", CONFIG.num_seg_train), ("val", CONFIG.num_seg_val),
                         ("test", CONFIG.num_seg_test)):
        samples = read_reasonseg_dir(dataset[f"reasonseg_{split}"])
        assert len(samples) == count
        for sample in samples:
            check_sample(sample)
            assert sample.masks[0].shape == (SIZE, SIZE)


def scenes_by_split(dataset) -> dict[str, list]:
    found = {"train": [], "val": [], "test": []}
    for record in (json.loads(dataset["pretrain"].read_text())
                   + json.loads(dataset["sft"].read_text())):
        found["train"] += [record["scene"]] if "scene" in record else record["scenes"]
    found["val"] += [s for item in json.loads(dataset["val"].read_text()) for s in item["scenes"]]
    found["test"] += [s for item in json.loads(dataset["eval"].read_text()) for s in item["scenes"]]
    for split in found:
        found[split] += [json.loads(p.read_text())["scene"]
                         for p in dataset[f"reasonseg_{split}"].glob("*.json")]
    return {split: [scene_from_json(s) for s in scenes] for split, scenes in found.items()}


def test_splits_disjoint_by_content(dataset):
    keys = {}
    for split, scenes in scenes_by_split(dataset).items():
        keys[split] = {scene_key(s, SIZE, CONFIG.size_range) for s in scenes}
        assert all(split_of(key) == split for key in keys[split])
    assert (not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
            and not keys["val"] & keys["test"])
    assert sum(SPLIT_PERCENT.values()) == 100
    # the key is coarse: a one-pixel shift keeps it, so near-duplicates cannot straddle splits
    shape = scenes_by_split(dataset)["test"][0][0]
    moved = type(shape)(shape.kind, shape.colour, shape.x0 + (1 if shape.cx % 8 < 6 else -1),
                        shape.y0, shape.size)
    assert (scene_key((moved,), SIZE, CONFIG.size_range)
            == scene_key((shape,), SIZE, CONFIG.size_range))


def test_scenes_match_pixels(dataset):
    """Each shape's mask is painted exactly its colour; everything else is background."""
    for item in json.loads(dataset["eval"].read_text()):
        names = item["img_name"] if isinstance(item["img_name"], list) else [item["img_name"]]
        for name, scene_json in zip(names, item["scenes"]):
            image = np.asarray(Image.open(dataset["eval"].parent / name))  # (H, W, 3)
            scene = scene_from_json(scene_json)
            covered = np.zeros((SIZE, SIZE), dtype=bool)
            for shape in scene:
                mask = shape_mask(shape, SIZE).astype(bool)
                assert (mask.sum() >= 0.4 * shape.size ** 2
                        and not (mask & covered).any())  # no overlaps
                assert (image[mask] == COLOURS[shape.colour]).all()
                covered |= mask
            assert (image[~covered] == BACKGROUND).all()


def test_reasonseg_masks_cover_the_target_colour(dataset):
    for split in ("train", "val", "test"):
        for sample in read_reasonseg_dir(dataset[f"reasonseg_{split}"]):
            scene = scene_from_json(sample.meta["scene"])
            target = next(s for s in scene if s.name == sample.meta["target"])
            mask = decode_mask(sample.masks[0])
            assert np.array_equal(mask, shape_mask(target, SIZE))
            # JPEG: compare the interior, with slack
            image = np.asarray(Image.open(sample.images[0]), dtype=int)
            inner = mask.astype(bool)
            inner[1:-1, 1:-1] &= mask[:-2, 1:-1].astype(bool) & mask[2:, 1:-1].astype(bool) \
                & mask[1:-1, :-2].astype(bool) & mask[1:-1, 2:].astype(bool)
            assert inner.sum() > 10
            assert np.abs(image[inner] - COLOURS[target.colour]).max() < 60
            for text, kind in zip(sample.meta["texts"], sample.meta["referring_types"]):
                assert refer(text, scene) == [target], (text, kind)


# ---------------------------------------------------------------------------- independent checks
def lead(a, b, direction) -> float:
    return {"left": b.cx - a.cx, "right": a.cx - b.cx,
            "top": b.cy - a.cy, "bottom": a.cy - b.cy}[direction]


def extreme(scene, direction):
    """The shape furthest in `direction`, demanding the margin over every other one."""
    winners = [a for a in scene if len(scene) > 1
               and all(lead(a, b, direction) >= MARGIN for b in scene if b is not a)]
    return winners[0] if winners else None


def area(shape) -> int:
    return int(shape_mask(shape, SIZE).sum())


def refer(text: str, scene) -> list:
    """Every shape a referring text (phrase or sentence) can mean."""
    text = text.rstrip("?")
    if m := re.fullmatch(r"(?:the|Where is the) (\w+) (circle|square|triangle)", text):
        return [s for s in scene if (s.colour, s.kind) == m.groups()]
    if m := re.fullmatch(r"the (red|green|blue|yellow) shape"
                         r"|Which shape is (red|green|blue|yellow)", text):
        return [s for s in scene if s.colour == (m[1] or m[2])]
    if m := re.fullmatch(r"the (circle|square|triangle)|Which shape is a (\w+)", text):
        return [s for s in scene if s.kind == (m[1] or m[2])]
    if m := re.fullmatch(r"(?:the shape with|Which shape has) the same colour as the (\w+)", text):
        anchors = [a for a in scene if a.kind == m[1]]
        assert len(anchors) == 1
        return [s for s in scene if s.colour == anchors[0].colour and s is not anchors[0]]
    if m := re.fullmatch(r"the (\w+) that is not (\w+)|Which (\w+) is not (\w+)", text):
        kind, colour = (m[1], m[2]) if m[1] else (m[3], m[4])
        return [s for s in scene if s.kind == kind and s.colour != colour]
    if m := re.fullmatch(r"the (\w+)-most shape|Which shape is furthest to the (\w+)", text):
        return [extreme(scene, m[1] or m[2])]
    if m := re.fullmatch(r"the (largest|smallest) shape|Which shape is the (largest|smallest)",
                         text):
        ranked = sorted(scene, key=area)
        largest = (m[1] or m[2]) == "largest"
        pick, runner_up = (ranked[-1], ranked[-2]) if largest else (ranked[0], ranked[1])
        assert max(area(pick), area(runner_up)) >= 1.25 * min(area(pick), area(runner_up))
        return [pick]
    if m := re.fullmatch(r"(?:the shape|Which shape is) "
                         r"(to the left of|to the right of|above|below) the (\w+ \w+)", text):
        direction = {"to the left of": "left", "to the right of": "right", "above": "top",
                     "below": "bottom"}[m[1]]
        anchor = next(s for s in scene if s.name == m[2])
        leads = [(s, lead(s, anchor, direction)) for s in scene if s is not anchor]
        assert all(abs(d) >= MARGIN for _, d in leads)
        return [s for s, d in leads if d > 0]
    raise AssertionError(f"unknown referring text {text!r}")


def check_answer(question: str, answer: str, scenes: list) -> None:
    question = question.split("\n")[-1]
    scene = scenes[0]
    if question == "How many shapes are there?":
        assert answer == str(len(scene))
    elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
        assert answer == str(sum(s.kind == m[1] for s in scene))
    elif m := re.fullmatch(r"What colour is the (\w+)\?", question):
        assert [s.colour for s in scene if s.kind == m[1]] == [answer]
    elif m := re.fullmatch(r"What is the shape of the (\w+) object\?", question):
        assert [s.kind for s in scene if s.colour == m[1]] == [answer]
    elif m := re.fullmatch(r"Which shape is (\w+)-most\?", question):
        assert extreme(scene, m[1]).name == answer
    elif m := re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?",
                           question):
        a, b = (next(s for s in scene if s.name == name) for name in (m[1], m[3]))
        d = lead(a, b, {"left of": "left", "right of": "right", "above": "top",
                        "below": "bottom"}[m[2]])
        assert abs(d) >= MARGIN and answer == ("yes" if d > 0 else "no")
    elif m := re.fullmatch(r"Is there a (\w+ \w+)\?", question):
        assert answer == ("yes" if m[1] in [s.name for s in scene] else "no")
    elif question == "Describe the image.":
        verb = "is" if len(scene) == 1 else "are"
        assert (answer == describe_scene(scene, SIZE)
                and answer.startswith(f"There {verb} {len(scene)} shape"))
        assert all(f"a {s.name} " in answer for s in scene)
    elif question == "How many shapes are there in the two images together?":
        assert answer == str(len(scenes[0]) + len(scenes[1]))
    elif m := re.fullmatch(r"Which image has an? (.+)\?", question):
        def has(scene_) -> bool:
            return any(m[1] in (s.kind, f"{s.colour} shape", s.name) for s in scene_)
        assert [has(s) for s in scenes] == ([True, False] if answer == "the first image"
                                            else [False, True])
    else:
        raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_scene(dataset):
    checked = 0
    for path in (dataset["val"], dataset["eval"]):
        for item in json.loads(path.read_text()):
            check_answer(item["question"], item["answer"],
                         [scene_from_json(s) for s in item["scenes"]])
            checked += 1
    for record in json.loads(dataset["sft"].read_text()):
        scenes_json = [record["scene"]] if "scene" in record else record["scenes"]
        scenes = [scene_from_json(s) for s in scenes_json]
        turns = record["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            assert answer["value"].startswith("### The final answer is: ")
            check_answer(question["value"],
                         answer["value"].removeprefix("### The final answer is: "), scenes)
            checked += 1
    assert checked > 100


def test_meta_reports_chance_and_majority_per_type(dataset):
    meta = json.loads(dataset["meta"].read_text())
    items = json.loads(dataset["eval"].read_text())
    stats = meta["question_types"]["eval"]
    assert sum(s["count"] for s in stats.values()) == len(items) == CONFIG.num_test
    assert all(s["count"] == CONFIG.num_test // 10 for s in stats.values())  # 10 types in rotation
    assert stats["colour"]["chance"] == 1 / 4 and stats["shape"]["chance"] == 1 / 3
    assert stats["relation"]["chance"] == 0.5 and stats["extreme"]["chance"] == 1 / 12
    assert stats["describe"]["chance"] is None and stats["describe"]["answer_type"] == "OPEN"
    relation = [i["answer"] for i in items if i["question_type"] == "relation"]
    assert (stats["relation"]["sample_majority"]
            == max(relation.count("yes"), relation.count("no")) / len(relation))
    # The baseline is the generator's majority, from many draws: near 1/2 for a 50/50 question,
    # whatever the few items written say; its shares are a distribution over the answer space.
    population = population_answers(CONFIG, seed=0)
    for name in ("exists", "relation", "multi_which"):
        assert abs(stats[name]["majority"] - 0.5) < 0.05
        drawn = population[name]
        assert stats[name]["majority"] == drawn.most_common(1)[0][1] / sum(drawn.values())
    assert sum(stats["count"]["answer_shares"].values()) == pytest.approx(1.0)
    assert set(stats["count"]["answer_shares"]) <= set(answer_space("count", CONFIG.max_shapes))
    assert meta["image_size"] == SIZE and meta["seed"] == 0


def test_command_line(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--quick", "--seed", "3", "--image-size", "48",
          "--num-test", "10"])
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert (meta["config"]["image_size"] == 48 and meta["counts"]["eval"] == 10
            and meta["seed"] == 3)
    assert Image.open(tmp_path / "cli" / "images" / "test" / "000000.png").size == (48, 48)
