"""What the model *sees*: its own "Describe the image." answers, parsed back into shapes and
compared with the truth, attribute by attribute.

A closed question mixes perception with reasoning ("Is there a red triangle?" needs the kind bound
to the colour); the description does not. The shapes world describes a scene as "There are 3
shapes: a red circle at the top left, a blue square in the centre and a green triangle at the
bottom right." (data/shapes/scene.py describe_scene), shapes left to right, so the i-th phrase of an
answer is compared with the i-th shape of the truth:

    count     the number of shapes the answer states (or lists), per scene
    colour    per true shape: the answer's shape at that place has its colour
    kind      ... its kind (circle, square, triangle)
    position  ... its position words (thirds of the image: "top left", "centre", ...)
    shape     ... all three at once
    pairs     per scene: the set of (colour, kind) the answer names is exactly the truth's

An answer in another form parses to no shapes and scores 0 on every attribute.
"""
from __future__ import annotations

import re

from minivlm.data.shapes.scene import COLOURS, KINDS

SHAPE_PHRASE = re.compile(rf"\ban? ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) (?:at|in) the "
                          r"((?:top |bottom )?(?:left|right)|top|bottom|centre)\b")
STATED_COUNT = re.compile(r"\bthere (?:is|are) (\d+) shapes?\b")
ATTRIBUTES = ("count", "colour", "kind", "position", "shape", "pairs")


def parse_description(text: str) -> tuple[int, list[tuple[str, str, str]]]:
    """(stated count, [(colour, kind, position), ...] in the order written). The count is the
    number of shapes listed when none is stated."""
    text = text.lower()
    shapes = [m.groups() for m in SHAPE_PHRASE.finditer(text)]
    stated = STATED_COUNT.search(text)
    return (int(stated.group(1)) if stated else len(shapes)), shapes


def describe_probe(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy over (model answer, true description) pairs; {} for no pairs."""
    if not pairs:
        return {}
    hits = dict.fromkeys(ATTRIBUTES, 0)
    num_shapes = 0
    for answer, truth in pairs:
        count, predicted = parse_description(answer or "")
        true_count, true_shapes = parse_description(truth)
        hits["count"] += count == true_count
        hits["pairs"] += ({(c, k) for c, k, _ in predicted}
                          == {(c, k) for c, k, _ in true_shapes})
        num_shapes += len(true_shapes)
        for guess, shape in zip(predicted, true_shapes):
            colour, kind, position = (g == t for g, t in zip(guess, shape))
            hits["colour"] += colour
            hits["kind"] += kind
            hits["position"] += position
            hits["shape"] += colour and kind and position
    per_scene = {"count", "pairs"}
    return {name: hits[name] / (len(pairs) if name in per_scene else max(num_shapes, 1))
            for name in ATTRIBUTES}


def records_probe(records: list[dict]) -> dict[str, float]:
    """The probe over an eval's "describe" records (model_answer against ground_truth)."""
    # A description without the final-answer marker is still what the model saw: read it whole.
    return describe_probe([(r["model_answer"] if r["has_marker"] else r.get("output", ""),
                            r["ground_truth"]) for r in records
                           if r.get("question_type") == "describe"])
