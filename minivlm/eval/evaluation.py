"""Evaluation on `Sample`s: VQA (closed accuracy, BERTScore F1) and segmentation (gIoU, cIoU).

Both the training scripts (validation every N steps, `vqa_metrics` / `seg_metrics`) and eval.py
(resumable, written to disk) go through the same three steps, so their numbers agree:
  1. `iter_*_batches` — generate / predict for a batch of samples, one JSON-ready record per item
     (the model's output and its score: a record is all a summary needs, so a resumed eval
     rebuilds the same numbers from the records on disk);
  2. `add_bertscore` — BERTScore F1 of every parsed answer, in one call at the end (one model load);
  3. `summarize_*` — the numbers, overall and per answer type / question type.
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from minivlm.data.images import image_size
from minivlm.data.readers import REASONSEG_ANSWER
from minivlm.constants import SEG_TOKEN
from minivlm.data.sample import Sample
from minivlm.eval.inference import answer_samples, predict_masks, prompt_turns
from minivlm.eval.seg_iou import SegIoUAccumulator, seg_iou
from minivlm.eval.text_metrics import answers_match, bertscore_f1, extract_final_answer
from minivlm.models.vision import ImageProcessor

# The Chiron-o1 reference's summary keys, spelled exactly as it writes them.
REFERENCE_ACC_KEY = "CLOSED Questions Acc"
REFERENCE_F1_KEY = "OPEN   Questions BERTScore-F1"


@dataclass
class BertScoreConfig:
    model: str = "minilm"  # "minilm" (offline, packaged), "roberta-large", a local folder, or "none"
    num_layers: int = 0  # 0: 6 for minilm, 17 for roberta-large, all layers of a local folder
    batch_size: int = 64

    @property
    def enabled(self) -> bool:
        return self.model.lower() != "none"


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the VLM (and its generate) in .module


def _batches(indices: list[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def question_text(sample: Sample) -> str:
    return prompt_turns(sample)[-1]["content"]


def prompt_length(sample: Sample, tokenizer, processor: ImageProcessor, tokens_per_tile: int) -> int:
    """Tokens in the generation prompt, images expanded (image sizes read from file headers)."""
    ids, _ = tokenizer.encode_chat(prompt_turns(sample), add_generation_prompt=True)
    tiles = sum(processor.num_tiles(image_size(p)) for p in sample.images)
    return len(ids) - len(sample.images) + tiles * tokens_per_tile


def generation_budget(model, tokenizer, processor: ImageProcessor, samples: list[Sample],
                      max_new_tokens: int) -> int:
    """`max_new_tokens`, cut so the longest prompt of the batch plus its answer fits the model's
    context (the reference's 1024 new tokens do not fit a small model's 1024 positions); a prompt
    that alone fills the context is an error naming the item."""
    limit = model.lm.config.max_seq_len
    lengths = [prompt_length(s, tokenizer, processor, model.image_tokens_per_tile) for s in samples]
    longest = max(lengths)
    if longest >= limit:
        worst = samples[lengths.index(longest)]
        raise ValueError(f"{worst.source}: the prompt is {longest} tokens (images included), the model's "
                         f"context is max_seq_len={limit}")
    return min(max_new_tokens, limit - longest)


# ---------------------------------------------------------------------------- VQA
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
    record = {"index": index, "image_name": sample.meta.get("img_name", [p.name for p in sample.images]),
              "question": question, "reason_answer": reasoning, "model_answer": answer,
              "ground_truth": gt, "answer_type": str(sample.meta.get("answer_type", "UNSPECIFIED")),
              "id": sample.meta.get("id"), "has_marker": answer is not None,
              "exact_match": answers_match(answer, gt)}
    if "question_type" in sample.meta:
        record["question_type"] = sample.meta["question_type"]
    if judge is not None:
        record["judge_correct"] = judge.is_correct(question, answer, gt) if answer is not None else False
    record["correct"] = record["judge_correct"] if judge is not None else record["exact_match"]
    record["output"] = output
    return record


def iter_vqa_batches(model, tokenizer, samples: list[Sample], indices: list[int] | None = None,
                     batch_size: int = 32, max_new_tokens: int = 32, judge=None):
    """Greedy answers for `samples[i]`, i in `indices` (default all), yielding one list of
    records per batch (eval.py writes each to disk before the next)."""
    model = _unwrap(model)
    processor = ImageProcessor.for_tower(model.vision)
    indices = list(range(len(samples))) if indices is None else indices
    for chunk in _batches(indices, batch_size):
        chunk_samples = [samples[i] for i in chunk]
        budget = generation_budget(model, tokenizer, processor, chunk_samples, max_new_tokens)
        outputs = answer_samples(model, tokenizer, processor, chunk_samples, batch_size=len(chunk),
                                 max_new_tokens=budget)
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


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _group_stats(records: list[dict]) -> dict:
    """Accuracy counts an answer without the marker as wrong; BERTScore averages parsed answers."""
    stats = {"count": len(records), "with_marker": sum(r["has_marker"] for r in records),
             "accuracy": _mean([float(r["correct"]) for r in records])}
    f1 = [r["bertscore_f1"] for r in records if "bertscore_f1" in r]
    if f1:
        stats["bertscore_f1"] = _mean(f1)
    return stats


def _by(records: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        if key in record:
            groups.setdefault(str(record[key]), []).append(record)
    return {name: _group_stats(group) for name, group in sorted(groups.items())}


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
        summary["per_question_type"] = _by(records, "question_type")
    return summary


def flat_vqa_metrics(summary: dict) -> dict[str, float]:
    """The summary as flat floats (what a training log takes); missing numbers are left out."""
    flat = {"accuracy": summary["overall"]["accuracy"],
            "marker_rate": summary["num_with_marker"] / max(summary["num_items"], 1),
            "closed_accuracy": summary["closed_accuracy"],
            "open_bertscore_f1": summary["open_bertscore_f1"]}
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
    was_training = model.training
    model.eval()
    try:
        records = [r for batch in iter_vqa_batches(model, tokenizer, samples, None, batch_size,
                                                   max_new_tokens, judge) for r in batch]
    finally:
        model.train(was_training)
    if bertscore is not None:
        add_bertscore(records, bertscore, device=str(next(model.parameters()).device))
    return flat_vqa_metrics(summarize_vqa(records))


# ---------------------------------------------------------------------------- segmentation
def teacher_forced_answer(sample: Sample) -> str:
    """LISA's validation feeds "Sure, it is [SEG]." for a one-mask item; an item with several
    masks keeps its own answer, whose [SEG]s pair with its masks in order."""
    seg_turns = [t for t in sample.turns if t["role"] == "assistant" and SEG_TOKEN in t["content"]]
    last = sample.turns[-1]
    if last["role"] != "assistant" or seg_turns != [last]:
        raise ValueError(f"{sample.source}: segmentation eval expects every {SEG_TOKEN} in the final "
                         "assistant turn")
    return REASONSEG_ANSWER if len(sample.masks) == 1 else last["content"]


def seg_record(index: int, sample: Sample, predicted: list, generated: str | None = None) -> dict:
    """Per item: the IoU of each mask and the accumulator's sums (what the summary adds up)."""
    if len(predicted) != len(sample.masks):
        raise ValueError(f"{sample.source}: {len(predicted)} predicted masks for {len(sample.masks)} targets")
    sums = SegIoUAccumulator()
    sums.update(predicted, sample.masks)
    record = {"index": index, "id": sample.meta.get("id"), "image_name": sample.images[0].name,
              "question": question_text(sample),
              "iou": [seg_iou(p, g)["giou"] for p, g in zip(predicted, sample.masks)],
              "sums": sums.state_dict()}
    if generated is not None:
        record["generated_answer"] = generated
        record["has_seg_token"] = SEG_TOKEN in generated
    return record


def _fit_masks(predicted: list, sample: Sample) -> list:
    """One prediction per target: a [SEG] the model did not say predicts an empty mask."""
    empty = [torch.zeros(m.shape, dtype=torch.uint8) for m in sample.masks[len(predicted):]]
    return (list(predicted) + empty)[: len(sample.masks)]


def iter_seg_batches(model, tokenizer, samples: list[Sample], indices: list[int] | None = None,
                     batch_size: int = 16, answer_mode: str = "generated", max_new_tokens: int = 32):
    """(records, predicted masks) per batch. The model always answers on its own first (its
    [SEG] rate is reported). Masks come from that generated answer by default, as in chat; with
    answer_mode="teacher_forced" from LISA's fed-in "Sure, it is [SEG]." (LISA's validation;
    it would hand the model the object's name where the data's answers carry it)."""
    if answer_mode not in ("generated", "teacher_forced"):
        raise ValueError(f"answer_mode={answer_mode!r}: expected 'generated' or 'teacher_forced'")
    model = _unwrap(model)
    processor = ImageProcessor.for_tower(model.vision)
    indices = list(range(len(samples))) if indices is None else indices
    for chunk in _batches(indices, batch_size):
        chunk_samples = [samples[i] for i in chunk]
        budget = generation_budget(model, tokenizer, processor, chunk_samples, max_new_tokens)
        generated = answer_samples(model, tokenizer, processor, chunk_samples,
                                   batch_size=len(chunk), max_new_tokens=budget)
        answers = generated if answer_mode == "generated" else \
            [teacher_forced_answer(s) for s in chunk_samples]
        masks = predict_masks(model, tokenizer, processor, chunk_samples, answers,
                              batch_size=len(chunk))
        masks = [_fit_masks(m, s) for m, s in zip(masks, chunk_samples)]
        records = [seg_record(i, s, m, g) for i, s, m, g in zip(chunk, chunk_samples, masks, generated)]
        yield records, masks


def summarize_seg(records: list[dict]) -> dict:
    total = SegIoUAccumulator()
    for record in records:
        total.merge(SegIoUAccumulator(**record["sums"]))
    summary = {**total.compute(), "num_items": len(records), "num_masks": int(total.count)}
    generated = [r["has_seg_token"] for r in records if "has_seg_token" in r]
    if generated:
        summary["seg_token_rate"] = sum(generated) / len(generated)
    return summary


def seg_metrics(model, tokenizer, samples: list[Sample], batch_size: int = 16,
                answer_mode: str = "generated", max_new_tokens: int = 16) -> dict[str, float]:
    """{"giou", "ciou"} (LISA's definitions) and "seg_token_rate" over the samples that have
    masks, for validation during training (see iter_seg_batches for `answer_mode`)."""
    samples = [s for s in samples if s.masks]
    if not samples:
        raise ValueError("seg_metrics: none of the samples has a mask to compare with")
    was_training = model.training
    model.eval()
    try:
        records = [r for batch, _ in iter_seg_batches(model, tokenizer, samples, None, batch_size,
                                                      answer_mode, max_new_tokens) for r in batch]
    finally:
        model.train(was_training)
    summary = summarize_seg(records)
    return {k: summary[k] for k in ("giou", "ciou", "seg_token_rate") if k in summary}
