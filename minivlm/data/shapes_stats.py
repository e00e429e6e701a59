"""The statistics meta.json reports for the shapes dataset, so a score can be read against them.

Per question type of an eval set: how many items, how many answers are possible, chance
(1 / that number) and the majority-answer baseline. Per ReasonSeg split: how often each
referring type was the one chosen for the target.
"""

from __future__ import annotations

from collections import Counter

from minivlm.data.shapes_questions import SINGLE_IMAGE, TWO_IMAGE, answer_space


def question_type_stats(items: list[dict], max_shapes: int) -> dict:
    stats = {}
    for question_type in list(SINGLE_IMAGE) + list(TWO_IMAGE):
        space = answer_space(question_type, max_shapes)
        answers = Counter(item["answer"] for item in items
                          if item["question_type"] == question_type)
        total = sum(answers.values())
        stats[question_type] = {
            "answer_type": "OPEN" if space is None else "CLOSED", "count": total,
            "num_answers": None if space is None else len(space),
            "chance": None if space is None else 1 / len(space),
            # always giving the most common answer: the bar a model blind to the image can reach
            "majority": (None if space is None or not total
                         else answers.most_common(1)[0][1] / total)}
    return stats


def referring_type_counts(annotations: list[dict]) -> dict[str, int]:
    """Counts of each annotation's first referring type (the chosen one), sorted by name."""
    return dict(sorted(Counter(a["referring_types"][0] for a in annotations).items()))
