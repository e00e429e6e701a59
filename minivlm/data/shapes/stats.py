"""The statistics meta.json reports for the shapes dataset, so a score can be read against them.

Per question type of an eval set: how many items, how many answers are possible, chance
(1 / that number) and the majority-answer baseline. The baseline is the generator's: the share of
its most common answer over many questions drawn as the eval writer draws them (`population`),
not the majority of the few hundred items written (40 items of a 50/50 question had a "majority"
of 0.675). Per ReasonSeg split: how often each referring type was the one chosen for the target.
"""

from __future__ import annotations

import random
from collections import Counter

from minivlm.data.shapes.questions import SINGLE_IMAGE, TWO_IMAGE, answer_space
from minivlm.data.shapes.scene import sample_scene

POPULATION_DRAWS = 1000  # per closed question type: the majority share to +-0.016


def population_answers(config, seed: int, draws: int = POPULATION_DRAWS) -> dict[str, Counter]:
    """Per question type, the answers of `draws` questions drawn as the eval writer draws them
    (scenes resampled until the type has an unambiguous question). `config`: a ShapesConfig."""
    rng = random.Random(f"{seed}:answer-population")  # its own stream: the files do not change
    answers = {}
    for question_type, ask in {**SINGLE_IMAGE, **TWO_IMAGE}.items():
        counts: Counter = Counter()
        if answer_space(question_type, config.max_shapes) is None:  # open: no majority answer
            answers[question_type] = counts
            continue
        for _ in range(draws):
            question = None
            while question is None:
                scenes = tuple(sample_scene(rng, config.image_size,
                                            rng.randint(config.min_shapes, config.max_shapes),
                                            config.size_range, config.gap)
                               for _ in range(2 if question_type in TWO_IMAGE else 1))
                question = ask(rng, scenes if question_type in TWO_IMAGE else scenes[0],
                               config.image_size)
            counts[question.answer] += 1
        answers[question_type] = counts
    return answers


def question_type_stats(items: list[dict], max_shapes: int,
                        population: dict[str, Counter]) -> dict:
    stats = {}
    for question_type in list(SINGLE_IMAGE) + list(TWO_IMAGE):
        space = answer_space(question_type, max_shapes)
        answers = Counter(item["answer"] for item in items
                          if item["question_type"] == question_type)
        total = sum(answers.values())
        drawn = population[question_type]
        closed = space is not None
        stats[question_type] = {
            "answer_type": "CLOSED" if closed else "OPEN", "count": total,
            "num_answers": len(space) if closed else None,
            "chance": 1 / len(space) if closed else None,
            # always giving the generator's most common answer: the bar a model blind to the
            # image can reach
            "majority": drawn.most_common(1)[0][1] / sum(drawn.values()) if closed else None,
            "sample_majority": (answers.most_common(1)[0][1] / total if closed and total
                                else None),
            "answer_shares": ({a: n / sum(drawn.values()) for a, n in drawn.most_common()}
                              if closed else None)}
    return stats


def referring_type_counts(annotations: list[dict]) -> dict[str, int]:
    """Counts of each annotation's first referring type (the chosen one), sorted by name."""
    return dict(sorted(Counter(a["referring_types"][0] for a in annotations).items()))
