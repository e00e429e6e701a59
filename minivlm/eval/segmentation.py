"""Segmentation evaluation on `Sample`s with masks: gIoU and cIoU as LISA reports them, and how
often the model says [SEG] on its own (steps in `loop.py`)."""
from __future__ import annotations

import torch

from minivlm.constants import SEG_TOKEN
from minivlm.data.masks import decode_masks
from minivlm.data.reasonseg import REASONSEG_ANSWER
from minivlm.data.sample import Sample
from minivlm.eval.inference import segment_samples
from minivlm.eval.loop import EvalLoop, eval_mode, question_text
from minivlm.eval.seg_iou import SegIoUAccumulator, seg_iou

# Where the scored masks come from: the model's own answer, LISA's fed-in answer, or both (the
# summary's giou/ciou are then the own answer's, "teacher_forced" holds LISA's protocol).
ANSWER_MODES = ("both", "generated", "teacher_forced")


def teacher_forced_answer(sample: Sample) -> str:
    """LISA's validation feeds "Sure, it is [SEG]." for a one-mask item; an item with several
    masks keeps its own answer, whose [SEG]s pair with its masks in order."""
    seg_turns = [t for t in sample.turns if t["role"] == "assistant" and SEG_TOKEN in t["content"]]
    last = sample.turns[-1]
    if last["role"] != "assistant" or seg_turns != [last]:
        raise ValueError(f"{sample.source}: segmentation eval expects every {SEG_TOKEN} in the "
                         "final assistant turn")
    return REASONSEG_ANSWER if len(sample.masks) == 1 else last["content"]


def mask_scores(sample: Sample, predicted: list) -> dict:
    """The IoU of each mask and the accumulator's sums (what a summary adds up)."""
    if len(predicted) != len(sample.masks):
        raise ValueError(f"{sample.source}: {len(predicted)} predicted masks "
                         f"for {len(sample.masks)} targets")
    targets = decode_masks(sample.masks)  # a reader's masks are decoded when scored
    sums = SegIoUAccumulator()
    sums.update(predicted, targets)
    return {"iou": [seg_iou(p, g)["giou"] for p, g in zip(predicted, targets)],
            "sums": sums.state_dict()}


def seg_record(index: int, sample: Sample, predicted: list, generated: str | None = None) -> dict:
    """Per item: which item it is, its masks' scores (`mask_scores`) and the model's own answer
    when given."""
    record = {"index": index, "id": sample.meta.get("id"), "image_name": sample.images[0].name,
              "question": question_text(sample), **mask_scores(sample, predicted)}
    if generated is not None:
        record["generated_answer"] = generated
        record["has_seg_token"] = SEG_TOKEN in generated
    return record


def _fit_masks(predicted: list, sample: Sample) -> list:
    """One prediction per target: a [SEG] the model did not say predicts an empty mask."""
    empty = [torch.zeros(m.shape, dtype=torch.uint8) for m in sample.masks[len(predicted):]]
    return (list(predicted) + empty)[: len(sample.masks)]


def _masks_from(loop: EvalLoop, samples: list[Sample], answers: list[str]) -> list[list]:
    """One forward pass with `answers` as the assistant turns: a mask per target."""
    masks = segment_samples(loop.model, loop.tokenizer, loop.processor, samples, answers,
                            batch_size=len(samples))
    return [_fit_masks(m, s) for m, s in zip(masks, samples)]


def iter_seg_batches(model, tokenizer, samples: list[Sample], indices: list[int] | None = None,
                     batch_size: int = 16, answer_mode: str = "generated",
                     max_new_tokens: int = 32):
    """(records, predicted masks) per batch. The model always answers on its own first (its
    [SEG] rate is reported). Masks come from that generated answer by default, as in chat; with
    answer_mode="teacher_forced" from LISA's fed-in "Sure, it is [SEG]." (LISA's validation;
    it would hand the model the object's name where the data's answers carry it). "both" scores
    the two from the one generation: the record's own-answer scores, plus LISA's under
    "teacher_forced" (one more forward pass per batch); the masks returned are the own answer's."""
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode={answer_mode!r}: expected one of {', '.join(ANSWER_MODES)}")
    loop = EvalLoop(model, tokenizer, samples)
    for chunk, chunk_samples, generated in loop.answered_batches(indices, batch_size,
                                                                 max_new_tokens):
        forced = ([teacher_forced_answer(s) for s in chunk_samples]
                  if answer_mode != "generated" else [])
        masks = _masks_from(loop, chunk_samples,
                            forced if answer_mode == "teacher_forced" else generated)
        records = [seg_record(i, s, m, g)
                   for i, s, m, g in zip(chunk, chunk_samples, masks, generated)]
        if answer_mode == "both":
            for record, sample, fed in zip(records, chunk_samples,
                                           _masks_from(loop, chunk_samples, forced)):
                record["teacher_forced"] = mask_scores(sample, fed)
        yield records, masks


def _iou_totals(sums: list[dict]) -> SegIoUAccumulator:
    total = SegIoUAccumulator()
    for part in sums:
        total.merge(SegIoUAccumulator(**part))
    return total


def summarize_seg(records: list[dict]) -> dict:
    """gIoU, cIoU and counts over the records' masks; with records of answer_mode "both",
    "teacher_forced": {"giou", "ciou"} of LISA's fed-in answer beside them."""
    total = _iou_totals([r["sums"] for r in records])
    summary = {**total.compute(), "num_items": len(records), "num_masks": int(total.count)}
    forced = [r["teacher_forced"]["sums"] for r in records if "teacher_forced" in r]
    if forced:
        summary["teacher_forced"] = _iou_totals(forced).compute()
    generated = [r["has_seg_token"] for r in records if "has_seg_token" in r]
    if generated:
        summary["seg_token_rate"] = sum(generated) / len(generated)
    return summary


def seg_metrics(model, tokenizer, samples: list[Sample], batch_size: int = 16,
                answer_mode: str = "generated", max_new_tokens: int = 16) -> dict[str, float]:
    """{"giou", "ciou"} (LISA's definitions) and "seg_token_rate" over the samples that have
    masks, for validation during training (see iter_seg_batches for `answer_mode`; "both" adds
    "teacher_forced/giou" and "teacher_forced/ciou")."""
    samples = [s for s in samples if s.masks]
    if not samples:
        raise ValueError("seg_metrics: none of the samples has a mask to compare with")
    with eval_mode(model):
        records = [r for batch, _ in iter_seg_batches(model, tokenizer, samples, None, batch_size,
                                                      answer_mode, max_new_tokens) for r in batch]
    summary = summarize_seg(records)
    metrics = {k: summary[k] for k in ("giou", "ciou", "seg_token_rate") if k in summary}
    forced = summary.get("teacher_forced", {})
    return metrics | {f"teacher_forced/{k}": v for k, v in forced.items()}
