"""Writers for one split of the shapes world at a time: train (pretrain + SFT), eval, ReasonSeg,
and the same kind of scenes in LISA's sem_seg and refer layouts.

Each writer owns one random stream, named by its purpose ("train", "eval-val", "seg-test"), so
changing one count never shifts another file's contents. generate.py calls them in order and writes
the JSON files and meta.json.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image

from minivlm.constants import FINAL_ANSWER_PREFIX, IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.coco_masks import pixel_outline
from minivlm.data.record_rules import PRETRAIN_PROMPTS
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.questions import SINGLE_IMAGE, TWO_IMAGE, Question, referring_expressions
from minivlm.data.shapes.scene import (KINDS, Scene, caption_scene, render, sample_scene,
                                       scene_key, scene_to_json, shape_mask, split_of)

TWO_IMAGE_PREFIX = f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\n"
SIMPLE_REFERRING = ("name", "colour", "kind")  # the rest need a step of reasoning
SEM_SEG_CLASSES = ("background",) + KINDS  # label value k is class k; every pixel has a class
SENTENCES_PER_REF = 3  # at most; refcoco has about three per referred object


class SceneWriter:
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


def response_text(question: Question, with_reasoning: bool) -> str:
    """The assistant turn. With reasoning it reads as readers.py builds a Chiron-o1 eval item's
    response: reasoning, a newline, then the marker; extract_final_answer splits it back."""
    reasoning = question.reasoning if with_reasoning else ""
    return (f"{reasoning}\n" if reasoning else "") + FINAL_ANSWER_PREFIX + question.answer


def _turns(first_prefix: str, questions: list[Question], with_reasoning: bool) -> list[dict]:
    conversations = []
    for i, q in enumerate(questions):
        conversations.append({"from": "human", "value": (first_prefix if i == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": response_text(q, with_reasoning)})
    return conversations


def write_train(out: Path, seed: int, c: ShapesConfig) -> tuple[list, list]:
    writer = SceneWriter(out, "train", seed, "train", c)
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
                    "conversations": _turns(f"{IMAGE_TOKEN}\n", questions, c.reasoning)})
    for j in range(c.num_train_pairs if len(pool) >= 2 else 0):
        (image_a, scene_a), (image_b, scene_b) = writer.rng.sample(pool, 2)
        questions = [q for ask in writer.rng.sample(list(TWO_IMAGE.values()), len(TWO_IMAGE))
                     if (q := ask(writer.rng, (scene_a, scene_b), c.image_size))]
        sft.append({"id": f"sft-pair-{j:06d}", "image": [image_a, image_b], "task": "vqa",
                    "scenes": [scene_to_json(scene_a), scene_to_json(scene_b)],
                    "question_types": [q.question_type for q in questions],
                    "conversations": _turns(TWO_IMAGE_PREFIX, questions, c.reasoning)})
    return pretrain, sft


def write_eval(out: Path, split: str, seed: int, num_items: int, c: ShapesConfig) -> list[dict]:
    """Chiron-o1 eval items, question types in rotation so each type gets an equal share."""
    writer = SceneWriter(out, split, seed, f"eval-{split}", c)
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
                      "question": prefix + question.text,
                      "reasoning": question.reasoning if c.reasoning else "",
                      "answer": question.answer, "answer_type": question.answer_type,
                      "question_type": question.question_type,
                      "scenes": [scene_to_json(scene) for scene in scenes]})
    return items


def write_reasonseg(out: Path, split: str, seed: int, num_items: int,
                     c: ShapesConfig) -> list[dict]:
    writer = SceneWriter(out, split, seed, f"seg-{split}", c)
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


def write_sem_seg(out: Path, split: str, seed: int, num_items: int, c: ShapesConfig) -> int:
    """sem_seg/SPLIT/: images/NNNNNN.png, annotations/NNNNNN.png (0 background, k the k-th kind,
    as in classes.txt), from scenes of their own stream."""
    writer = SceneWriter(out, split, seed, f"semseg-{split}", c)
    folder = out / "sem_seg" / split
    for sub in ("images", "annotations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(SEM_SEG_CLASSES) + "\n")
    for j in range(num_items):
        scene = writer.scene()
        label = np.zeros((c.image_size, c.image_size), dtype=np.uint8)
        for shape in scene:  # shapes never overlap: the order does not matter
            label[shape_mask(shape, c.image_size) == 1] = SEM_SEG_CLASSES.index(shape.kind)
        render(scene, c.image_size).save(folder / "images" / f"{j:06d}.png", format="PNG")
        Image.fromarray(label, "L").save(folder / "annotations" / f"{j:06d}.png", format="PNG")
    return num_items


def write_refer(out: Path, seed: int, counts: dict[str, int], c: ShapesConfig) -> dict[str, int]:
    """refer/: refs(unc).p (a pickle of plain dicts, as refcoco's), instances.json (COCO, each
    shape a polygon along its pixels' edges, so it decodes to exactly the painted pixels) and
    images/SPLIT_NNNNNN.png. Every shape of a scene is referred to, by its name and up to two more
    of its expressions. Returns the number of refs per split."""
    folder = out / "refer"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    num_sentences = 0
    for split, num_items in counts.items():
        writer = SceneWriter(out, split, seed, f"refer-{split}", c)
        for j in range(num_items):
            scene = writer.scene(min_shapes=max(2, c.min_shapes))
            file_name = f"{split}_{j:06d}.png"
            render(scene, c.image_size).save(folder / "images" / file_name, format="PNG")
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "height": c.image_size,
                           "width": c.image_size, "scene": scene_to_json(scene)})
            options = referring_expressions(scene, c.image_size)
            for shape in scene:
                mask = shape_mask(shape, c.image_size)
                rows, cols = np.nonzero(mask)
                ann_id = len(annotations) + 1
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": KINDS.index(shape.kind) + 1,
                    "segmentation": [pixel_outline(mask)], "area": int(mask.sum()), "iscrowd": 0,
                    "bbox": [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1),
                             int(rows.max() - rows.min() + 1)]})
                # refcoco's expressions carry no article ("man on the left"): LISA's templates
                # put "the" before them ("Can you segment the red circle in this image?")
                phrases = [o[1].removeprefix("the ") for o in options
                           if o[0] is shape and o[3] != "name"]
                picked = [shape.name] + writer.rng.sample(
                    phrases, min(SENTENCES_PER_REF - 1, len(phrases)))
                sentences = [{"sent": p, "raw": p, "tokens": p.split(),
                              "sent_id": num_sentences + k + 1} for k, p in enumerate(picked)]
                num_sentences += len(sentences)
                refs.append({"ref_id": len(refs) + 1, "ann_id": ann_id, "image_id": image_id,
                             "split": split, "category_id": KINDS.index(shape.kind) + 1,
                             "file_name": file_name, "sentences": sentences,
                             "sent_ids": [s["sent_id"] for s in sentences], "target": shape.name})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": k + 1, "name": kind, "supercategory": "shape"}
                                for k, kind in enumerate(KINDS)]}
    (folder / "instances.json").write_text(json.dumps(instances))
    # protocol 2, as the refcoco pickles were written (Python 2)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return {split: sum(r["split"] == split for r in refs) for split in counts}
