"""VQA evaluation on `Sample`s: closed accuracy (exact match or a judge) and BERTScore F1, scored
and summarised as the Chiron-o1 reference does, plus what it leaves out (steps in `loop.py`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from minivlm.data.sample import Sample
from minivlm.eval.loop import EvalLoop, eval_mode, question_text
from minivlm.eval.scene_probe import records_probe
from minivlm.eval.text_metrics import (answers_match, bertscore_f1, extract_final_answer,
                                       normalize_answer)
from minivlm.ranges import at_least, check_ranges

# The Chiron-o1 reference's summary keys, spelled exactly as it writes them.
REFERENCE_ACC_KEY = "CLOSED Questions Acc"
REFERENCE_F1_KEY = "OPEN   Questions BERTScore-F1"


@dataclass
class BertScoreConfig:
    # "minilm" (offline, packaged), "roberta-large", a local folder, or "none"
    model: str = "minilm"
    # 0: 6 for minilm, 17 for roberta-large, all layers of a local folder
    num_layers: int = field(default=0, metadata=at_least(0))
    batch_size: int = field(default=64, metadata=at_least(1))

    def __post_init__(self):
        check_ranges(self)

    @property
    def enabled(self) -> bool:
        return self.model.lower() != "none"


# ---------------------------------------------------------------------------- records
def ground_truth(sample: Sample) -> str:
    """The reference answer: the record's `answer` field, else what follows the final-answer
    marker in the last assistant turn (else that whole turn)."""
    if "answer" in sample.meta:
        return str(sample.meta["answer"])
    content = next(t["content"] for t in reversed(sample.turns) if t["role"] == "assistant")
    reasoning, answer = extract_final_answer(content)
    return answer if answer is not None else reasoning


def vqa_record(index: int, sample: Sample, output: str, judge=None) -> dict:
    """The reference's per-item fields (index ... answer_type), then ours. `correct` is the
    judge's verdict when a judge is given, else normalised exact match; an output without the
    final-answer marker is never asked about and counts as wrong."""
    reasoning, answer = extract_final_answer(output)
    gt, question = ground_truth(sample), question_text(sample)
    record = {"index": index,
              "image_name": sample.meta.get("img_name", [p.name for p in sample.images]),
              "question": question, "reason_answer": reasoning, "model_answer": answer,
              "ground_truth": gt, "answer_type": str(sample.meta.get("answer_type", "UNSPECIFIED")),
              "id": sample.meta.get("id"), "has_marker": answer is not None,
              "exact_match": answers_match(answer, gt)}
    if "question_type" in sample.meta:
        record["question_type"] = sample.meta["question_type"]
    if judge is not None:
        record["judge_correct"] = (judge.is_correct(question, answer, gt) if answer is not None
                                   else False)
    record["correct"] = record["judge_correct"] if judge is not None else record["exact_match"]
    record["output"] = output
    return record


def iter_vqa_batches(model, tokenizer, samples: list[Sample], indices: list[int] | None = None,
                     batch_size: int = 32, max_new_tokens: int = 32, judge=None):
    """Greedy answers for `samples[i]`, i in `indices` (default all), yielding one list of
    records per batch (eval.py writes each to disk before the next)."""
    loop = EvalLoop(model, tokenizer, samples)
    for chunk, _, outputs in loop.answered_batches(indices, batch_size, max_new_tokens):
        yield [vqa_record(i, samples[i], output, judge) for i, output in zip(chunk, outputs)]


def add_bertscore(records: list[dict], config: BertScoreConfig, device: str | None = None) -> None:
    """Set `bertscore_f1` on every record with a parsed answer (any answer type, as the
    reference), recomputed from scratch so a resumed eval gets the same numbers."""
    parsed = [r for r in records if r["has_marker"]]
    for record in records:
        record.pop("bertscore_f1", None)
    if not config.enabled or not parsed:
        return
    scores = bertscore_f1([r["model_answer"] for r in parsed], [r["ground_truth"] for r in parsed],
                          model_type=config.model, num_layers=config.num_layers or None,
                          batch_size=config.batch_size, device=device)
    for record, score in zip(parsed, scores):
        record["bertscore_f1"] = score


# ---------------------------------------------------------------------------- summary
def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


NO_MARKER = "(no final answer)"  # the answer column of an output without the marker


def standard_error(accuracy: float | None, count: int) -> float | None:
    """sqrt(p (1 - p) / n): the standard error of an accuracy measured on n independent items
    (40 items at p = 0.5 is +-0.08: too coarse to tell two recipes apart)."""
    if accuracy is None or count == 0:
        return None
    return (accuracy * (1 - accuracy) / count) ** 0.5


def answer_distribution(records: list[dict]) -> dict[str, dict[str, int]]:
    """{truth: {answer: count}}, answers normalised as they are scored: a model that says "yes"
    whatever the truth shows as the same row twice."""
    table: dict[str, dict[str, int]] = {}
    for record in records:
        truth = normalize_answer(record["ground_truth"])
        answer = (normalize_answer(record["model_answer"]) if record["has_marker"]
                  else NO_MARKER)
        row = table.setdefault(truth, {})
        row[answer] = row.get(answer, 0) + 1
    return {truth: dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0])))
            for truth, row in sorted(table.items())}


def _group_stats(records: list[dict], with_answers: bool = False) -> dict:
    """Accuracy counts an answer without the marker as wrong; BERTScore averages parsed answers.
    `with_answers`: what was answered against the truth (closed questions of one type)."""
    accuracy = _mean([float(r["correct"]) for r in records])
    stats = {"count": len(records), "with_marker": sum(r["has_marker"] for r in records),
             "accuracy": accuracy, "standard_error": standard_error(accuracy, len(records))}
    f1 = [r["bertscore_f1"] for r in records if "bertscore_f1" in r]
    if f1:
        stats["bertscore_f1"] = _mean(f1)
    if with_answers and all(r["answer_type"] == "CLOSED" for r in records):
        stats["answer_distribution"] = answer_distribution(records)
    return stats


def _by(records: list[dict], key: str, with_answers: bool = False) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        if key in record:
            groups.setdefault(str(record[key]), []).append(record)
    return {name: _group_stats(group, with_answers) for name, group in sorted(groups.items())}


def summarize_vqa(records: list[dict]) -> dict:
    """The reference's two keys (means over the items *with* the marker, whatever their
    answer_type, as its script computes them), then ours: counts, the items without the
    marker, and accuracy / BERTScore overall, per answer_type and per question_type."""
    records = sorted(records, key=lambda r: r["index"])
    parsed = [r for r in records if r["has_marker"]]
    per_answer_type = _by(records, "answer_type")
    f1 = [r["bertscore_f1"] for r in parsed if "bertscore_f1" in r]
    summary = {
        REFERENCE_ACC_KEY: _mean([float(r["correct"]) for r in parsed]),
        REFERENCE_F1_KEY: _mean(f1),
        "num_items": len(records), "num_with_marker": len(parsed),
        "num_missing_marker": len(records) - len(parsed),
        "missing_marker_indices": [r["index"] for r in records if not r["has_marker"]],
        "closed_accuracy": per_answer_type.get("CLOSED", {}).get("accuracy"),
        "open_bertscore_f1": per_answer_type.get("OPEN", {}).get("bertscore_f1"),
        "overall": _group_stats(records),
        "per_answer_type": per_answer_type,
    }
    if any("question_type" in r for r in records):
        summary["per_question_type"] = _by(records, "question_type", with_answers=True)
    if perception := records_probe(records):  # the shapes world's "Describe the image."
        summary["perception"] = perception
    return summary


def flat_vqa_metrics(summary: dict) -> dict[str, float]:
    """The summary as flat floats (what a training log takes); missing numbers are left out."""
    flat = {"accuracy": summary["overall"]["accuracy"],
            "marker_rate": summary["num_with_marker"] / max(summary["num_items"], 1),
            "closed_accuracy": summary["closed_accuracy"],
            "open_bertscore_f1": summary["open_bertscore_f1"]}
    for attribute, accuracy in summary.get("perception", {}).items():
        flat[f"perception/{attribute}"] = accuracy
    for question_type, stats in summary.get("per_question_type", {}).items():
        flat[f"accuracy/{question_type}"] = stats["accuracy"]
        if "bertscore_f1" in stats:
            flat[f"bertscore_f1/{question_type}"] = stats["bertscore_f1"]
    return {k: v for k, v in flat.items() if v is not None}


def vqa_metrics(model, tokenizer, samples: list[Sample], batch_size: int = 32,
                max_new_tokens: int = 32, bertscore: BertScoreConfig | None = None,
                judge=None) -> dict[str, float]:
    """Closed accuracy (normalised exact match), overall and per question type, for validation
    during training. BERTScore is off unless a config is given (it loads a second model)."""
    with eval_mode(model):
        records = [r for batch in iter_vqa_batches(model, tokenizer, samples, None, batch_size,
                                                   max_new_tokens, judge) for r in batch]
    if bertscore is not None:
        add_bertscore(records, bertscore, device=str(next(model.parameters()).device))
    return flat_vqa_metrics(summarize_vqa(records))
