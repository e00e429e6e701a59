"""The built-in synthetic world: coloured shapes, written in the real data formats.

    python -m minivlm.data.shapes --out data/shapes --seed 0
    python -m minivlm.data.shapes --out /tmp/shapes --quick            # tiny, for tests
    python -m minivlm.data.shapes --out data/shapes --num-train-images 6000 --image-size 64

Files under --out (every path inside the JSON files is relative to the file's folder, so the
ordinary readers load them with no extra argument):
  images/{train,val,test}/NNNNNN.png     the scenes (lossless PNG)
  pretrain.json          LLaVA: one caption per train image
  sft.json               LLaVA: several closed questions (and sometimes "Describe the image.")
                         per train image, answered "### The final answer is: <answer>";
                         then two-image records ("Image 1: <image>\\nImage 2: <image>\\n...")
  val.json, eval.json    Chiron-o1 eval format, one question per item, every type equally often
  reasonseg/{train,val,test}/NNNNNN.jpg + .json   ReasonSeg (LISA labelme) format
  meta.json              seed, config, counts, and per question type the number of possible
                         answers, chance (1 / that number) and the majority-answer baseline
                         (see shapes_stats)
Extra keys ride along for analysis and tests: "question_type(s)", "scene(s)" (ground truth),
"target" and "referring_types" (ReasonSeg). The same seed gives byte-identical files.
A scene's split (train/val/test) depends only on its content: see shapes_scene.split_of.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minivlm.cli import add_config_args, config_from_args
from minivlm.constants import FINAL_ANSWER_PREFIX, IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.shapes_questions import SINGLE_IMAGE, TWO_IMAGE, Question, referring_expressions
from minivlm.data.shapes_scene import (COLOURS, KINDS, Scene, caption_scene, render, sample_scene,
                                       scene_key, scene_to_json, split_of)
from minivlm.data.shapes_stats import question_type_stats, referring_type_counts
from minivlm.ranges import at_least, between, check_ranges
from minivlm.errors import run_cli

GENERATOR = "minivlm.data.shapes"
VERSION = 1  # bump when the output changes, so cached datasets are regenerated
PRETRAIN_PROMPTS = ("Write a short caption for the image.", "What is in the picture?")
TWO_IMAGE_PREFIX = f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\n"
SIMPLE_REFERRING = ("name", "colour", "kind")  # the rest need a step of reasoning
MOST_SHAPES = len(KINDS) * len(COLOURS)  # no two shapes in a scene share colour and kind


@dataclass
class ShapesConfig:
    image_size: int = field(default=32, metadata=at_least(16))  # smaller leaves no room to draw
    min_shapes: int = field(default=1, metadata=between(1, MOST_SHAPES))
    max_shapes: int = field(default=4, metadata=between(1, MOST_SHAPES))
    # each is captioned in pretrain.json and questioned in sft.json
    num_train_images: int = field(default=3000, metadata=at_least(0))
    questions_per_image: int = field(default=4, metadata=at_least(0))  # SFT turns per train image
    num_train_pairs: int = field(default=600, metadata=at_least(0))  # two-image SFT records
    num_val: int = field(default=200, metadata=at_least(0))  # items in val.json
    num_test: int = field(default=400, metadata=at_least(0))  # items in eval.json
    num_seg_train: int = field(default=1500, metadata=at_least(0))
    num_seg_val: int = field(default=100, metadata=at_least(0))
    num_seg_test: int = field(default=200, metadata=at_least(0))
    jpeg_quality: int = field(default=95, metadata=between(1, 100))  # ReasonSeg's, as LISA's

    def __post_init__(self):
        check_ranges(self)
        if self.min_shapes > self.max_shapes:
            raise ValueError(f"ShapesConfig: min_shapes {self.min_shapes} is more than "
                             f"max_shapes {self.max_shapes}")

    @classmethod
    def quick(cls) -> ShapesConfig:
        """Tiny counts: a complete dataset in well under a second, for tests."""
        return cls(num_train_images=16, num_train_pairs=4, num_val=20, num_test=20,
                   num_seg_train=6, num_seg_val=3, num_seg_test=3)

    @property
    def size_range(self) -> tuple[int, int]:
        return round(0.25 * self.image_size), round(0.44 * self.image_size)  # 8..14 px at 32

    @property
    def gap(self) -> int:
        return max(1, self.image_size // 16)  # empty pixels between shapes


class _Writer:
    """Draws scenes of one split from one random stream and saves them as numbered images."""

    def __init__(self, out: Path, split: str, seed: int, stream: str, config: ShapesConfig):
        self.out, self.split, self.config = out, split, config
        # one stream per purpose: counts elsewhere don't shift it
        self.rng = random.Random(f"{seed}:{stream}")
        self.count = 0

    def scene(self, min_shapes: int | None = None) -> Scene:
        """Rejection-sample until the scene's content hashes into this writer's split."""
        c = self.config
        while True:
            num_shapes = self.rng.randint(min_shapes or c.min_shapes, c.max_shapes)
            scene = sample_scene(self.rng, c.image_size, num_shapes, c.size_range, c.gap)
            if split_of(scene_key(scene, c.image_size, c.size_range)) == self.split:
                return scene

    def save_png(self, scene: Scene) -> str:
        relative = f"images/{self.split}/{self.count:06d}.png"
        self.count += 1
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scene, self.config.image_size).save(path, format="PNG")
        return relative


def _turns(first_prefix: str, questions: list[Question]) -> list[dict]:
    conversations = []
    for i, q in enumerate(questions):
        conversations.append({"from": "human", "value": (first_prefix if i == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": FINAL_ANSWER_PREFIX + q.answer})
    return conversations


def _write_train(out: Path, seed: int, c: ShapesConfig) -> tuple[list, list]:
    writer = _Writer(out, "train", seed, "train", c)
    pretrain, sft, pool = [], [], []
    for i in range(c.num_train_images):
        scene = writer.scene()
        image = writer.save_png(scene)
        pool.append((image, scene))
        prompt = writer.rng.choice(PRETRAIN_PROMPTS)
        caption = caption_scene(scene, c.image_size)
        pretrain.append({"id": f"pretrain-{i:06d}", "image": image, "task": "caption",
                         "scene": scene_to_json(scene),
                         "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                                           {"from": "gpt", "value": caption}]})
        questions = []
        for ask in writer.rng.sample(list(SINGLE_IMAGE.values()), len(SINGLE_IMAGE)):
            if (len(questions) < c.questions_per_image
                    and (q := ask(writer.rng, scene, c.image_size))):
                questions.append(q)
        sft.append({"id": f"sft-{i:06d}", "image": image, "task": "vqa",
                    "scene": scene_to_json(scene),
                    "question_types": [q.question_type for q in questions],
                    "conversations": _turns(f"{IMAGE_TOKEN}\n", questions)})
    for j in range(c.num_train_pairs if len(pool) >= 2 else 0):
        (image_a, scene_a), (image_b, scene_b) = writer.rng.sample(pool, 2)
        questions = [q for ask in writer.rng.sample(list(TWO_IMAGE.values()), len(TWO_IMAGE))
                     if (q := ask(writer.rng, (scene_a, scene_b), c.image_size))]
        sft.append({"id": f"sft-pair-{j:06d}", "image": [image_a, image_b], "task": "vqa",
                    "scenes": [scene_to_json(scene_a), scene_to_json(scene_b)],
                    "question_types": [q.question_type for q in questions],
                    "conversations": _turns(TWO_IMAGE_PREFIX, questions)})
    return pretrain, sft


def _write_eval(out: Path, split: str, seed: int, num_items: int, c: ShapesConfig) -> list[dict]:
    """Chiron-o1 eval items, question types in rotation so each type gets an equal share."""
    writer = _Writer(out, split, seed, f"eval-{split}", c)
    types = list(SINGLE_IMAGE) + list(TWO_IMAGE)
    items = []
    for k in range(num_items):
        question_type = types[k % len(types)]
        question = None
        while question is None:  # resample scenes until this type has an unambiguous question
            if question_type in TWO_IMAGE:
                scenes = (writer.scene(), writer.scene())
                question = TWO_IMAGE[question_type](writer.rng, scenes, c.image_size)
            else:
                scenes = (writer.scene(),)
                question = SINGLE_IMAGE[question_type](writer.rng, scenes[0], c.image_size)
        names = [writer.save_png(scene) for scene in scenes]
        prefix = TWO_IMAGE_PREFIX if len(scenes) == 2 else f"{IMAGE_TOKEN}\n"
        items.append({"id": k + 1, "img_name": names if len(names) > 1 else names[0],
                      "question": prefix + question.text, "reasoning": "",
                      "answer": question.answer, "answer_type": question.answer_type,
                      "question_type": question.question_type,
                      "scenes": [scene_to_json(scene) for scene in scenes]})
    return items


def _write_reasonseg(out: Path, split: str, seed: int, num_items: int,
                     c: ShapesConfig) -> list[dict]:
    writer = _Writer(out, split, seed, f"seg-{split}", c)
    folder = out / "reasonseg" / split
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for j in range(num_items):
        # one shape leaves nothing to reason about
        scene = writer.scene(min_shapes=max(2, c.min_shapes))
        options = referring_expressions(scene, c.image_size)
        reasoning = [o for o in options if o[3] not in SIMPLE_REFERRING]
        chosen = writer.rng.choice(reasoning if reasoning and writer.rng.random() < 0.8
                                   else options)
        target = chosen[0]
        others = [o for o in options if o[0] is target and o is not chosen]
        picked = [chosen] + writer.rng.sample(others, min(2, len(others)))
        is_sentence = writer.rng.random() < 0.5
        name = f"{j:06d}"
        # subsampling=0 (4:4:4) keeps colours crisp at 32 px
        render(scene, c.image_size).save(folder / f"{name}.jpg", format="JPEG",
                                         quality=c.jpeg_quality, subsampling=0)
        annotation = {"text": [o[2] if is_sentence else o[1] for o in picked],
                      "is_sentence": is_sentence,
                      "shapes": [{"label": "target", "points": [list(p) for p in target.polygon()],
                                  "shape_type": "polygon", "group_id": None, "flags": {}}],
                      "imagePath": f"{name}.jpg", "imageHeight": c.image_size,
                      "imageWidth": c.image_size,
                      "target": target.name,
                      "answer": f"Sure, it is the {target.name} {SEG_TOKEN}.",
                      "referring_types": [o[3] for o in picked],
                      "scene": scene_to_json(scene)}
        (folder / f"{name}.json").write_text(json.dumps(annotation, indent=1))
        annotations.append(annotation)
    return annotations


OUTPUTS = ("images", "reasonseg", "pretrain.json", "sft.json", "val.json", "eval.json", "meta.json")


def _prepare(out: Path, stamp: dict) -> bool:
    """True if `out` already holds this exact dataset; else clear our old outputs (only ours)."""
    meta_path = out / "meta.json"
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("generator") != GENERATOR:
            raise ValueError(f"{meta_path}: not written by {GENERATOR}; "
                             f"refusing to overwrite {out}")
        if previous.get("complete") and all(previous.get(k) == v for k, v in stamp.items()):
            return True
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty and holds no shapes meta.json; "
                         "choose an empty or new folder")
    return False


def generate(out_dir: str | Path, seed: int = 0,
             config: ShapesConfig | None = None) -> dict[str, Path]:
    """Write the whole dataset under `out_dir`, unless the same seed and config are already there.

    Returns the paths by name: pretrain, sft, val, eval (files), reasonseg_{train,val,test}
    (folders), meta.
    """
    c = config or ShapesConfig()
    out = Path(out_dir)
    paths = {"pretrain": out / "pretrain.json", "sft": out / "sft.json", "val": out / "val.json",
             "eval": out / "eval.json",
             **{f"reasonseg_{s}": out / "reasonseg" / s for s in ("train", "val", "test")},
             "meta": out / "meta.json"}
    stamp = {"generator": GENERATOR, "version": VERSION, "seed": seed, "config": asdict(c)}
    if _prepare(out, stamp):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    # marks a half-written folder as ours
    paths["meta"].write_text(json.dumps({**stamp, "complete": False}))

    pretrain, sft = _write_train(out, seed, c)
    val = _write_eval(out, "val", seed, c.num_val, c)
    test = _write_eval(out, "test", seed, c.num_test, c)
    seg = {s: _write_reasonseg(out, s, seed, n, c)
           for s, n in (("train", c.num_seg_train), ("val", c.num_seg_val),
                        ("test", c.num_seg_test))}
    for name, records in (("pretrain", pretrain), ("sft", sft), ("val", val), ("eval", test)):
        paths[name].write_text(json.dumps(records, indent=1))

    meta = {**stamp, "complete": True, "image_size": c.image_size,
            "counts": {"train_images": c.num_train_images, "pretrain": len(pretrain),
                       "sft_records": len(sft),
                       "sft_questions": sum(len(r["question_types"]) for r in sft),
                       "val": len(val), "eval": len(test),
                       **{f"reasonseg_{s}": len(a) for s, a in seg.items()}},
            "question_types": {"val": question_type_stats(val, c.max_shapes),
                               "eval": question_type_stats(test, c.max_shapes)},
            "referring_types": {s: referring_type_counts(anns) for s, anns in seg.items()},
            "files": {name: str(path.relative_to(out)) for name, path in paths.items()}}
    paths["meta"].write_text(json.dumps(meta, indent=1))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (created; must be empty or ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="start from ShapesConfig.quick()'s tiny counts")
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    add_config_args(parser, ShapesConfig, defaults=asdict(ShapesConfig.quick()) if quick else None)
    args = parser.parse_args(argv)
    config = config_from_args(args, ShapesConfig)
    paths = generate(args.out, args.seed, config)
    counts = json.loads(paths["meta"].read_text())["counts"]
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
