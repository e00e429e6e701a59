"""Questions about shapes scenes, each with exactly one short correct answer.

Every `ask_*` function returns None when the scene cannot support an unambiguous question of
its type (e.g. "What colour is the circle?" with two circles, or "Which shape is left-most?"
when two shapes are nearly level). Positions compare shape centres and demand a clear margin
(a tenth of the image) so a question is never decided by a pixel.

Referring expressions for segmentation ("the shape with the same colour as the triangle")
follow the same rule: one is only offered when exactly one shape fits it.

Each question also carries a one-sentence reasoning (reasoning.py), used when the dataset is
generated with ShapesConfig.reasoning; it is computed always and draws no random numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from minivlm.data.shapes.reasoning import (colour_members_reasoning, count_reasoning,
                                           identity_reasoning, kind_count_reasoning,
                                           left_to_right, order_reasoning, pair_count_reasoning,
                                           pair_order_reasoning, pair_which_reasoning)
from minivlm.data.shapes.scene import COLOURS, KINDS, Scene, Shape, describe_scene, shape_area

DIRECTIONS = {  # name: (coordinate, sign), sign +1 means "larger coordinate wins"
    "left": ("cx", -1), "right": ("cx", +1), "top": ("cy", -1), "bottom": ("cy", +1)}
RELATION_WORDS = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
SIDE_WORDS = {"left": "to the left of", "right": "to the right of", "top": "above",
              "bottom": "below"}
ORDINALS = ("the first image", "the second image")
LARGER_BY = 1.25  # "the largest shape" needs 25% more pixels than the runner-up


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    question_type: str
    answer_type: str = "CLOSED"
    reasoning: str = ""  # written before the final-answer marker; "" for open questions


def margin(image_size: int) -> float:
    return image_size / 10


def _unique(scene: Scene, **attributes: str) -> Shape | None:
    found = [s for s in scene if all(getattr(s, k) == v for k, v in attributes.items())]
    return found[0] if len(found) == 1 else None


def ranked_along(scene: Scene, direction: str) -> list[Shape]:
    """The shapes from the `direction` side inwards: for "left", the left-most first."""
    coordinate, sign = DIRECTIONS[direction]
    return sorted(scene, key=lambda s: sign * getattr(s, coordinate), reverse=True)


def _extreme(scene: Scene, direction: str, image_size: int) -> Shape | None:
    """The shape furthest in `direction`, if it leads every other shape by the margin."""
    coordinate, sign = DIRECTIONS[direction]
    ranked = ranked_along(scene, direction)
    if len(ranked) < 2:
        return None
    lead = sign * (getattr(ranked[0], coordinate) - getattr(ranked[1], coordinate))
    return ranked[0] if lead >= margin(image_size) else None


# ---------------------------------------------------------------------------- one-image questions
def ask_count(rng: random.Random, scene: Scene, image_size: int) -> Question:
    return Question("How many shapes are there?", str(len(scene)), "count",
                    reasoning=count_reasoning(scene))


def ask_count_kind(rng: random.Random, scene: Scene, image_size: int) -> Question:
    kind = rng.choice(KINDS)
    return Question(f"How many {kind}s are there?",
                    str(sum(s.kind == kind for s in scene)), "count_kind",
                    reasoning=kind_count_reasoning(scene, kind))


def ask_colour(rng: random.Random, scene: Scene, image_size: int) -> Question | None:
    kinds = [k for k in KINDS if _unique(scene, kind=k)]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    shape = _unique(scene, kind=kind)
    return Question(f"What colour is the {kind}?", shape.colour, "colour",
                    reasoning=identity_reasoning(f"the {kind}", shape))


def ask_kind(rng: random.Random, scene: Scene, image_size: int) -> Question | None:
    colours = [c for c in COLOURS if _unique(scene, colour=c)]
    if not colours:
        return None
    colour = rng.choice(colours)
    shape = _unique(scene, colour=colour)
    return Question(f"What is the shape of the {colour} object?", shape.kind, "shape",
                    reasoning=identity_reasoning(f"the {colour} object", shape))


def ask_extreme(rng: random.Random, scene: Scene, image_size: int) -> Question | None:
    options = [(d, s) for d in DIRECTIONS if (s := _extreme(scene, d, image_size))]
    if not options:
        return None
    direction, shape = rng.choice(options)
    return Question(f"Which shape is {direction}-most?", shape.name, "extreme",
                    reasoning=order_reasoning(direction, ranked_along(scene, direction)))


def ask_relation(rng: random.Random, scene: Scene, image_size: int) -> Question | None:
    """"Is the red circle left of the blue square?" with yes and no equally likely."""
    options = []
    for a in scene:
        for b in scene:
            for direction, (coordinate, sign) in DIRECTIONS.items():
                lead = sign * (getattr(a, coordinate) - getattr(b, coordinate))
                if a is not b and abs(lead) >= margin(image_size):
                    options.append((a, b, direction, "yes" if lead > 0 else "no"))
    wanted = rng.choice(("yes", "no"))
    options = [o for o in options if o[3] == wanted] or options
    if not options:
        return None
    a, b, direction, answer = rng.choice(options)
    first, second = (a, b) if answer == "yes" else (b, a)
    return Question(f"Is the {a.name} {RELATION_WORDS[direction]} the {b.name}?", answer,
                    "relation", reasoning=pair_order_reasoning(direction, first, second))


def ask_exists(rng: random.Random, scene: Scene, image_size: int) -> Question:
    present = [s.name for s in scene]
    absent = [f"{c} {k}" for k in KINDS for c in COLOURS if f"{c} {k}" not in present]
    answer = rng.choice(("yes", "no"))
    name = rng.choice(present if answer == "yes" else absent)
    return Question(f"Is there a {name}?", answer, "exists",
                    reasoning=colour_members_reasoning(scene, name.split()[0]))


def ask_describe(rng: random.Random, scene: Scene, image_size: int) -> Question:
    return Question("Describe the image.", describe_scene(scene, image_size), "describe", "OPEN")


SINGLE_IMAGE = {"count": ask_count, "count_kind": ask_count_kind, "colour": ask_colour,
                "shape": ask_kind, "extreme": ask_extreme, "relation": ask_relation,
                "exists": ask_exists, "describe": ask_describe}


# ---------------------------------------------------------------------------- two-image questions
def ask_multi_count(rng: random.Random, scenes: tuple[Scene, Scene], image_size: int) -> Question:
    return Question("How many shapes are there in the two images together?",
                    str(len(scenes[0]) + len(scenes[1])), "multi_count",
                    reasoning=pair_count_reasoning(scenes))


def ask_multi_which(rng: random.Random, scenes: tuple[Scene, Scene],
                    image_size: int) -> Question | None:
    """"Which image has a circle?" for a property found in exactly one of the two images."""
    def properties(scene: Scene) -> dict[str, tuple[str, str]]:
        """"a circle" -> ("kind", "circle"): the phrase and the attribute that has it."""
        kinds = {f"a {s.kind}": ("kind", s.kind) for s in scene}
        colours = {f"a {s.colour} shape": ("colour", s.colour) for s in scene}
        return kinds | colours | {f"a {s.name}": ("name", s.name) for s in scene}

    first, second = properties(scenes[0]), properties(scenes[1])
    index = rng.randrange(2)  # pick the answer first so first/second are balanced
    mine, theirs = (first, second) if index == 0 else (second, first)
    options = [p for p in mine if p not in theirs]
    if not options:
        return None
    phrase = rng.choice(options)
    attribute, value = mine[phrase]
    matches = tuple([s for s in left_to_right(scene) if getattr(s, attribute) == value]
                    for scene in scenes)
    return Question(f"Which image has {phrase}?", ORDINALS[index], "multi_which",
                    reasoning=pair_which_reasoning(matches, phrase.split(" ", 1)[1]))


TWO_IMAGE = {"multi_count": ask_multi_count, "multi_which": ask_multi_which}


def answer_space(question_type: str, max_shapes: int) -> list[str] | None:
    """Every answer a closed question type can have (chance = 1 / len); None for open questions."""
    return {
        "count": [str(n) for n in range(1, max_shapes + 1)],
        "count_kind": [str(n) for n in range(0, min(max_shapes, len(COLOURS)) + 1)],
        "colour": list(COLOURS),
        "shape": list(KINDS),
        "extreme": [f"{c} {k}" for c in COLOURS for k in KINDS],
        "relation": ["yes", "no"],
        "exists": ["yes", "no"],
        "multi_count": [str(n) for n in range(2, 2 * max_shapes + 1)],
        "multi_which": list(ORDINALS),
        "describe": None,
    }[question_type]


# ---------------------------------------------------------------------------- referring expressions
def referring_expressions(scene: Scene, image_size: int) -> list[tuple[Shape, str, str, str]]:
    """Every unambiguous (target, phrase, sentence, referring_type) for the scene."""
    found = []
    for t in scene:
        found.append((t, f"the {t.name}", f"Where is the {t.name}?", "name"))
        if _unique(scene, colour=t.colour):
            found.append((t, f"the {t.colour} shape", f"Which shape is {t.colour}?", "colour"))
        if _unique(scene, kind=t.kind):
            found.append((t, f"the {t.kind}", f"Which shape is a {t.kind}?", "kind"))
        for a in scene:  # anchors named by one attribute, pointing at the target by the other
            if a is t:
                continue
            if (a.colour == t.colour and _unique(scene, kind=a.kind)
                    and sum(s.colour == t.colour for s in scene) == 2):
                found.append((t, f"the shape with the same colour as the {a.kind}",
                              f"Which shape has the same colour as the {a.kind}?", "same_colour"))
            if a.kind == t.kind and sum(s.kind == t.kind for s in scene) == 2:
                found.append((t, f"the {t.kind} that is not {a.colour}",
                              f"Which {t.kind} is not {a.colour}?", "same_kind"))
        for direction in DIRECTIONS:
            if _extreme(scene, direction, image_size) is t:
                found.append((t, f"the {direction}-most shape",
                              f"Which shape is furthest to the {direction}?", "extreme"))
    found += _size_expressions(scene, image_size) + _relative_expressions(scene, image_size)
    return found


def _size_expressions(scene: Scene, image_size: int) -> list[tuple[Shape, str, str, str]]:
    if len(scene) < 2:
        return []
    ranked = sorted(scene, key=lambda s: shape_area(s, image_size))
    areas = [shape_area(s, image_size) for s in ranked]
    found = []
    if areas[-1] >= LARGER_BY * areas[-2]:
        found.append((ranked[-1], "the largest shape", "Which shape is the largest?", "largest"))
    if areas[1] >= LARGER_BY * areas[0]:
        found.append((ranked[0], "the smallest shape", "Which shape is the smallest?", "smallest"))
    return found


def _relative_expressions(scene: Scene, image_size: int) -> list[tuple[Shape, str, str, str]]:
    """"the shape to the right of the green circle": the only other shape on that side, all
    clearly placed."""
    found = []
    for anchor in scene:
        others = [s for s in scene if s is not anchor]
        for direction, (coordinate, sign) in DIRECTIONS.items():
            leads = [sign * (getattr(s, coordinate) - getattr(anchor, coordinate)) for s in others]
            if any(abs(lead) < margin(image_size) for lead in leads):
                continue
            ahead = [s for s, lead in zip(others, leads) if lead > 0]
            if len(ahead) == 1:
                side = SIDE_WORDS[direction]
                found.append((ahead[0], f"the shape {side} the {anchor.name}",
                              f"Which shape is {side} the {anchor.name}?", "relative"))
    return found
