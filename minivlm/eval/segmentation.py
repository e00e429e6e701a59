"""Segmentation evaluation on `Sample`s with masks: gIoU and cIoU as LISA reports them, and how
often the model says [SEG] on its own (steps in `loop.py`)."""
from __future__ import annotations

import torch

from minivlm.constants import SEG_TOKEN
from minivlm.data.reasonseg import REASONSEG_ANSWER
from minivlm.data.sample import Sample
from minivlm.eval.inference import segment_samples
from minivlm.eval.loop import EvalLoop, eval_mode, question_text
from minivlm.eval.seg_iou import SegIoUAccumulator, seg_iou

ANSWER_MODES = ("generated", "teacher_forced")


def teacher_forced_answer(sample: Sample) -> str:
    """LISA's validation feeds "Sure, it is [SEG]." for a one-mask item; an item with several
    masks keeps its own answer, whose [SEG]s pair with its masks in order."""
    seg_turns = [t for t in sample.turns if t["role"] == "assistant" and SEG_TOKEN in t["content"]]
    last = sample.turns[-1]
    if last["role"] != "assistant" or seg_turns != [last]:
        raise ValueError(f"{sample.source}: segmentation eval expects every {SEG_TOKEN} in the "
                         "final assistant turn")
    return REASONSEG_ANSWER if len(sample.masks) == 1 else last["content"]


def seg_record(index: int, sample: Sample, predicted: list, generated: str | None = None) -> dict:
    """Per item: the IoU of each mask and the accumulator's sums (what the summary adds up)."""
    if len(predicted) != len(sample.masks):
        raise ValueError(f"{sample.source}: {len(predicted)} predicted masks "
                         f"for {len(sample.masks)} targets")
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
                     batch_size: int = 16, answer_mode: str = "generated",
                     max_new_tokens: int = 32):
    """(records, predicted masks) per batch. The model always answers on its own first (its
    [SEG] rate is reported). Masks come from that generated answer by default, as in chat; with
    answer_mode="teacher_forced" from LISA's fed-in "Sure, it is [SEG]." (LISA's validation;
    it would hand the model the object's name where the data's answers carry it)."""
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode={answer_mode!r}: expected 'generated' or 'teacher_forced'")
    loop = EvalLoop(model, tokenizer, samples)
    for chunk, chunk_samples, generated in loop.answered_batches(indices, batch_size,
                                                                 max_new_tokens):
        answers = (generated if answer_mode == "generated"
                   else [teacher_forced_answer(s) for s in chunk_samples])
        masks = segment_samples(loop.model, tokenizer, loop.processor, chunk_samples, answers,
                                batch_size=len(chunk))
        masks = [_fit_masks(m, s) for m, s in zip(masks, chunk_samples)]
        records = [seg_record(i, s, m, g)
                   for i, s, m, g in zip(chunk, chunk_samples, masks, generated)]
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
    with eval_mode(model):
        records = [r for batch, _ in iter_seg_batches(model, tokenizer, samples, None, batch_size,
                                                      answer_mode, max_new_tokens) for r in batch]
    summary = summarize_seg(records)
    return {k: summary[k] for k in ("giou", "ciou", "seg_token_rate") if k in summary}
