"""LISA's question and answer templates, the rules that draw among them, and how the drawn
questions and answers about one image become Samples.

The lists are copied from LISA's utils/utils.py, the draws from its sem_seg_dataset.py,
refer_seg_dataset.py and reason_seg_dataset.py. Every draw takes a random.Random made for one
record (record_rng), never the global generator, so the same seed gives the same samples.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np

from minivlm.constants import IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.sample import Sample, check_sample

SHORT_QUESTION_LIST = (
    IMAGE_TOKEN + "\n" + "Can you segment the {class_name} in this image?",
    IMAGE_TOKEN + "\n" + "Please segment the {class_name} in this image.",
    IMAGE_TOKEN + "\n"
    + "What is {class_name} in this image? Please respond with segmentation mask.",
    IMAGE_TOKEN + "\n" + "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTION_LIST = (
    IMAGE_TOKEN + "\n" + "{sent} Please respond with segmentation mask.",
    IMAGE_TOKEN + "\n" + "{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTION_LIST = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)
ANSWER_LIST = (
    f"It is {SEG_TOKEN}.",
    f"Sure, {SEG_TOKEN}.",
    f"Sure, it is {SEG_TOKEN}.",
    f"Sure, the segmentation result is {SEG_TOKEN}.",
    f"{SEG_TOKEN}.",
)

# reason_seg_dataset.py's three answer modes for an image that has an explanation.
SEG_ONLY, SEG_AND_EXPLANATION, TEXT_ONLY = 0, 1, 2


def record_rng(seed: int, index: int) -> random.Random:
    """Record `index`'s own generator. A string seed is hashed (sha512), so (seed 0, record 1)
    and (seed 1, record 0) do not share a stream as seed + index would."""
    return random.Random(f"{seed}:{index}")


def sample_indices(rng: random.Random, count: int, wanted: int) -> list[int]:
    """LISA: np.random.choice(count, size=wanted, replace=False) when there are enough (a random
    subset in random order), else all of them in order."""
    return rng.sample(range(count), wanted) if count >= wanted else list(range(count))


def short_question(rng: random.Random, class_name: str) -> str:
    """A class name or a referring phrase; LISA lower-cases it."""
    return rng.choice(SHORT_QUESTION_LIST).format(class_name=class_name.lower())


def long_question(rng: random.Random, sentence: str) -> str:
    """A ReasonSeg sentence (is_sentence), kept as written."""
    return rng.choice(LONG_QUESTION_LIST).format(sent=sentence)


def seg_answer(rng: random.Random) -> str:
    return rng.choice(ANSWER_LIST)


def explanatory_mode(rng: random.Random, probability: float) -> int:
    """reason_seg_dataset.py: `2 if random.random() < explanatory else random.randint(0, 1)`."""
    return TEXT_ONLY if rng.random() < probability else rng.randint(SEG_ONLY, SEG_AND_EXPLANATION)


def explanatory_question(rng: random.Random, text: str) -> str:
    """The question of the [SEG] + explanation mode: the text as written, then the request
    (LISA: DEFAULT_IMAGE_TOKEN + "\\n" + text + " " + random.choice(EXPLANATORY_QUESTION_LIST))."""
    return f"{IMAGE_TOKEN}\n{text} {rng.choice(EXPLANATORY_QUESTION_LIST)}"


def seg_samples(image: Path, questions: list[str], answers: list[str], masks: list[np.ndarray],
                where: str, meta: dict, multi_turn: bool) -> list[Sample]:
    """The drawn questions about one image, each answered with one [SEG] (masks in the same
    order), as LISA's conversations: one Sample per question, each showing the image (LISA
    builds each conversation from an empty message list, and the model sees each as its own
    sequence with its own copy of the image). `multi_turn` puts them in one Sample instead, the
    image in the first question only."""
    if multi_turn:
        turns = []
        for k, (question, answer) in enumerate(zip(questions, answers)):
            # every template starts with the image placeholder; later turns drop it
            text = question if k == 0 else question.removeprefix(IMAGE_TOKEN + "\n")
            turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return [Sample(images=[image], turns=turns, masks=list(masks), source=where, meta=meta)]
    return [Sample(images=[image], source=where, masks=[mask],
                   turns=[{"role": "user", "content": question},
                          {"role": "assistant", "content": answer}],
                   meta={**meta, "conversation": k})
            for k, (question, answer, mask) in enumerate(zip(questions, answers, masks))]


def convert_image_records(records: list[tuple[str, object]],
                          convert: Callable[[object, str, int], list[Sample]],
                          errors: list[str] | None) -> list[Sample]:
    """convert_all for readers whose record (one image) gives several Samples: `convert(record,
    location, index)` draws from record_rng(seed, index). A bad record (or a ValueError standing
    in for one) raises, or with an `errors` list is noted there and left out."""
    samples = []
    for index, (where, record) in enumerate(records):
        try:
            if isinstance(record, ValueError):
                raise record
            produced = convert(record, where, index)
            for sample in produced:
                check_sample(sample)
        except ValueError as error:
            if errors is None:
                raise
            errors.append(str(error))
        else:
            samples += produced
    return samples
