"""The short reasoning written before "### The final answer is:" (ShapesConfig.reasoning).

Chiron-o1 answers with its reasoning first and the marked answer last. Here each closed question
gets one sentence that is true for the scene, names every shape it uses in the world's own words
("the red circle") and leads straight to the answer: the shapes counted, the shapes of the asked
colour or kind, or the shapes in order along the asked direction. Writing "the red shapes: the
red circle" in text is what lets a small LM tie a colour to a kind.

The builders only read the scene and the question's choices (never the random stream), so
turning the reasoning on leaves every scene, question and answer of a seed unchanged.
"""

from __future__ import annotations

from minivlm.data.shapes.scene import Scene, Shape, join_words


def the_shapes(shapes: list[Shape]) -> str:
    """"the red circle, the blue square and the green triangle"."""
    return join_words([f"the {s.name}" for s in shapes])


def left_to_right(scene: Scene) -> list[Shape]:
    """The order the captions use (shape_phrases), so both texts list a scene the same way."""
    return sorted(scene, key=lambda s: (s.cx, s.cy))


def count_reasoning(scene: Scene) -> str:
    return f"I see {the_shapes(left_to_right(scene))}."


def matching_reasoning(matches: list[Shape], plural: str, singular: str) -> str:
    """"The circles: the red circle and the blue circle." or "I see no circle."."""
    if not matches:
        return f"I see no {singular}."
    return f"The {plural}: {the_shapes(matches)}."


def kind_count_reasoning(scene: Scene, kind: str) -> str:
    return matching_reasoning([s for s in left_to_right(scene) if s.kind == kind], f"{kind}s", kind)


def colour_members_reasoning(scene: Scene, colour: str) -> str:
    """For "Is there a red triangle?": every red shape, so the kind is read off the colour."""
    return matching_reasoning([s for s in left_to_right(scene) if s.colour == colour],
                              f"{colour} shapes", f"{colour} shape")


def identity_reasoning(description: str, shape: Shape) -> str:
    """"The circle is the red circle." (colour) / "The red object is the red triangle." (shape)."""
    return f"{description[0].upper()}{description[1:]} is the {shape.name}."


def order_reasoning(direction: str, ranked: list[Shape]) -> str:
    """"From the left: the blue square, the red circle and the green triangle."."""
    return f"From the {direction}: {the_shapes(ranked)}."


def pair_order_reasoning(direction: str, first: Shape, second: Shape) -> str:
    """"From the left: the red circle, then the blue square." (the two shapes of a relation)."""
    return f"From the {direction}: the {first.name}, then the {second.name}."


def pair_count_reasoning(scenes: tuple[Scene, Scene]) -> str:
    first, second = len(scenes[0]), len(scenes[1])
    return (f"The first image has {first} shape{'s' * (first != 1)} "
            f"and the second {second}.")


def pair_which_reasoning(matches: tuple[list[Shape], list[Shape]], thing: str) -> str:
    """"The first image has the red circle; the second has no circle." for "a circle"."""
    first, second = (the_shapes(m) if m else f"no {thing}" for m in matches)
    return f"The first image has {first}; the second has {second}."
