"""Batched inference on `Sample`s: answer the last question, or predict the [SEG] masks.

Prompts are the sample's turns up to (not including) the final assistant turn, rendered with the
checkpoint's chat template plus the generation prompt, exactly as in training. Batches are
left-padded so every row's next token lands in the same column of the KV cache.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from minivlm.data.batch import collate, expand_image_tokens
from minivlm.data.images import image_size, load_image
from minivlm.data.sample import Sample
from minivlm.models.sam_transforms import sam_preprocess


def prompt_turns(sample: Sample) -> list[dict]:
    turns = list(sample.turns)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def encode_prompt(sample: Sample, tokenizer, image_processor, tokens_per_tile: int,
                  answer: str | None = None) -> dict:
    """Token ids of the prompt (plus `answer` as the assistant turn when given), with the
    image tokens expanded, and the preprocessed images."""
    turns = prompt_turns(sample)
    if answer is not None:
        turns = turns + [{"role": "assistant", "content": answer}]
    ids, labels = tokenizer.encode_chat(turns, add_generation_prompt=answer is None)
    # Paths, or images already decoded to RGB (lmms-eval's tasks hand over PIL images).
    pixels = [image_processor(p if isinstance(p, Image.Image) else load_image(p))
              for p in sample.images]
    ids, labels = expand_image_tokens(ids, labels, tokenizer.image_token_id,
                                      [px.shape[0] * tokens_per_tile for px in pixels])
    return dict(input_ids=ids, labels=labels, pixel_values=pixels, masks=[])


def batches(items: list, batch_size: int) -> Iterator[list]:
    """Consecutive slices of `items`, `batch_size` long (the last may be shorter)."""
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def prompt_batch(model, tokenizer, image_processor, samples: list[Sample]):
    """(input_ids, attention_mask, pixel_values or None) of the samples' prompts, left-padded,
    on the model's device: what `generate` and `generate_steps` take."""
    device = next(model.parameters()).device
    batch = collate([encode_prompt(s, tokenizer, image_processor, model.image_tokens_per_tile)
                     for s in samples], tokenizer.pad_id, left_pad=True)
    pixels = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), pixels


@torch.no_grad()
def answer_samples(model, tokenizer, image_processor, samples: list[Sample],
                   batch_size: int = 16, max_new_tokens: int = 64, progress=None) -> list[str]:
    """Greedy answers, one string per sample."""
    answers = []
    for chunk in batches(samples, batch_size):
        new_tokens = model.generate(*prompt_batch(model, tokenizer, image_processor, chunk),
                                    max_new_tokens=max_new_tokens,
                                    stop_token_ids=tokenizer.stop_token_ids,
                                    pad_token_id=tokenizer.pad_id)
        answers += [tokenizer.decode(row.tolist()) for row in new_tokens.cpu()]
        if progress is not None:
            progress.update(len(chunk))
    return answers


@torch.no_grad()
def stream_answer(model, tokenizer, image_processor, sample: Sample, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Iterator[str]:
    """The answer to one sample, as the whole text so far after each new token (the web demo
    streams it): decoding the ids together, not piece by piece, keeps a word or a multi-byte
    character split across tokens whole. Greedy by default, ending where `answer_samples` does."""
    ids = []
    for token in model.generate_steps(*prompt_batch(model, tokenizer, image_processor, [sample]),
                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, stop_token_ids=tokenizer.stop_token_ids,
                                      pad_token_id=tokenizer.pad_id, generator=generator):
        ids.append(int(token[0]))
        yield tokenizer.decode(ids)


@torch.no_grad()
def segment_samples(model, tokenizer, image_processor, samples: list[Sample], answers: list[str],
                    batch_size: int = 16, threshold: float = 0.0) -> list[list[torch.Tensor]]:
    """Binary (H, W) masks for every [SEG] in each sample's `answer` (teacher-forced: the answer
    text is fed as the assistant turn, as LISA's validation does), at the image's own size.
    `VLM.predict_masks` gives the logits of one padded batch; this batches samples and pairs
    each sample with its own masks."""
    device = next(model.parameters()).device
    out: list[list[torch.Tensor]] = []
    for chunk, chunk_answers in zip(batches(samples, batch_size), batches(answers, batch_size)):
        items = [encode_prompt(s, tokenizer, image_processor, model.image_tokens_per_tile, a)
                 for s, a in zip(chunk, chunk_answers)]
        if (sam := getattr(model.seg_head, "image_encoder", None)) is not None:
            for item, sample in zip(items, chunk):  # SAM's own input frame (--seg-image-encoder)
                image = sample.images[0]
                image = image if isinstance(image, Image.Image) else load_image(image)
                item["seg_image"] = sam_preprocess(np.asarray(image), sam.img_size)
        batch = collate(items, tokenizer.pad_id)
        sizes = [_size(s.images[0])[::-1] for s in chunk]  # (H, W), header only
        seg_images = batch.get("seg_images")
        logits = model.predict_masks(batch["input_ids"].to(device),
                                     batch["attention_mask"].to(device),
                                     batch["pixel_values"].to(device),
                                     batch["seg_tile_index"].to(device), sizes,
                                     None if seg_images is None else seg_images.to(device))
        seg_counts = (batch["input_ids"][:, 1:] == tokenizer.seg_token_id).sum(1).tolist()
        masks = [(m > threshold).to(torch.uint8).cpu() for m in logits]
        for count in seg_counts:
            out.append(masks[:count])
            masks = masks[count:]
    return out


def _size(image) -> tuple[int, int]:
    """(W, H) of a path (its header only) or of an image already decoded."""
    return image.size if isinstance(image, Image.Image) else tuple(image_size(image))


def mask_overlay(image: Image.Image, mask, alpha: float = 0.45) -> Image.Image:
    """The image, tinted red where the (H, W) 0/1 mask is 1 (eval examples and chat)."""
    red = Image.blend(image, Image.new("RGB", image.size, (255, 0, 0)), alpha)
    return Image.composite(red, image, Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255))
