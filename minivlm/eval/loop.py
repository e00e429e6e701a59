"""What the VQA and segmentation evaluations share, so that validation during training
(`vqa_metrics`, `seg_metrics`) and eval.py's resumable runs give the same numbers. Both go through
the same three steps:
  1. `EvalLoop.answered_batches` — the model's greedy answers, a batch of samples at a time, each
     batch's answer length cut to fit the model's context;
  2. `vqa_record` / `seg_record` — one JSON-ready record per item (the model's output and its
     score: a record is all a summary needs, so a resumed eval rebuilds the same numbers from the
     records on disk);
  3. `summarize_vqa` / `summarize_seg` — the numbers, overall and per answer or question type.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from PIL import Image
from torch import nn

from minivlm.data.images import ImageProcessor, image_size
from minivlm.data.sample import Sample
from minivlm.eval.inference import answer_samples, batches, prompt_turns


def question_text(sample: Sample) -> str:
    return prompt_turns(sample)[-1]["content"]


def prompt_length(sample: Sample, tokenizer, processor: ImageProcessor,
                  tokens_per_tile: int) -> int:
    """Tokens in the generation prompt, images expanded (image sizes read from file headers, or
    from images already decoded)."""
    ids, _ = tokenizer.encode_chat(prompt_turns(sample), add_generation_prompt=True)
    tiles = sum(processor.num_tiles(p.size if isinstance(p, Image.Image) else image_size(p))
                for p in sample.images)
    return len(ids) - len(sample.images) + tiles * tokens_per_tile


def generation_budget(model, tokenizer, processor: ImageProcessor, samples: list[Sample],
                      max_new_tokens: int) -> int:
    """`max_new_tokens`, cut so the longest prompt of the batch plus its answer fits the model's
    context (the reference's 1024 new tokens do not fit a small model's 1024 positions); a prompt
    that alone fills the context is an error naming the item."""
    limit = model.lm.config.max_seq_len
    lengths = [prompt_length(s, tokenizer, processor, model.image_tokens_per_tile)
               for s in samples]
    longest = max(lengths)
    if longest >= limit:
        worst = samples[lengths.index(longest)]
        raise ValueError(f"{worst.source}: the prompt is {longest} tokens (images included), "
                         f"the model's context is max_seq_len={limit}")
    return min(max_new_tokens, limit - longest)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then back to the mode it was in (validation runs in the middle
    of training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class EvalLoop:
    """How both evaluations start: the plain VLM (the trainer passes its model, never the DDP
    wrapper), the image processor its vision tower expects, and the samples."""

    def __init__(self, model, tokenizer, samples: list[Sample]):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = ImageProcessor.for_tower(self.model.vision)
        self.samples = samples

    def answered_batches(self, indices: list[int] | None, batch_size: int, max_new_tokens: int
                         ) -> Iterator[tuple[list[int], list[Sample], list[str]]]:
        """(indices, samples, greedy answers) per batch of `samples[i]`, i in `indices` (default
        all), so a caller can write each batch's records before the next one starts."""
        indices = list(range(len(self.samples))) if indices is None else indices
        for chunk in batches(indices, batch_size):
            chunk_samples = [self.samples[i] for i in chunk]
            budget = generation_budget(self.model, self.tokenizer, self.processor, chunk_samples,
                                       max_new_tokens)
            answers = answer_samples(self.model, self.tokenizer, self.processor, chunk_samples,
                                     batch_size=len(chunk), max_new_tokens=budget)
            yield chunk, chunk_samples, answers
