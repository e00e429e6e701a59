"""minivlm as an lmms-eval model, so that its benchmarks (MMStar, MME, POPE, ...) run on our
checkpoints (pip install -e ".[harness]"):

    python -m lmms_eval --model minivlm --model_args pretrained=runs/seg --tasks mmstar

lmms-eval hands a model lists of requests (`Instance`s) and reads back one result for each:
  generate_until  (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> the answer
  loglikelihood   (context, continuation, doc_to_visual, doc_id, task, split)
                  -> (-log P(continuation | context, images), whether greedy decoding says it)
(The sign: lmms-eval 0.7.3 picks a multiple-choice answer by argmin, as its own models return a
loss, not the log-probability its docstring asks for: EvolvingLMMs-Lab/lmms-eval issue #370.)
Each request becomes a one-turn `Sample` (the context as the question, one <image> per visual,
placed as our readers place them) and goes through eval.py's own prompt building and batched
greedy decoding (`answer_samples`), so a task over our eval split scores exactly what eval.py
does (tests/test_lmms.py checks it).

lmms-eval finds the model by name through the `lmms_eval.models` entry point in pyproject.toml,
which names `manifest` below. As nanoVLM does during training, a built object works too:
`simple_evaluate(model=LmmsModel(pretrained="runs/seg"), tasks=[...])`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from minivlm.constants import IGNORE_INDEX
from minivlm.data.batch import collate
from minivlm.data.images import ImageProcessor
from minivlm.data.readers import add_placeholders
from minivlm.data.sample import Sample
from minivlm.devices import resolve_device
from minivlm.eval.inference import answer_samples, batches, encode_prompt
from minivlm.eval.loop import prompt_length
from minivlm.eval.text_metrics import extract_final_answer
from minivlm.load import load_vlm
from minivlm.quant.swap import prepare_quantized

MODEL_NAME = "minivlm"
# Arguments lmms-eval passes to every model, used or not.
HARNESS_ARGS = ("max_batch_size",)
# Without a task's max_new_tokens: eval.py's VQA default (the Chiron-o1 reference's), which
# `generate` cuts to what the model's context leaves.
DEFAULT_MAX_NEW_TOKENS = 1024


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point names: lmms-eval's registry reads a manifest
    (model name -> class path), not the class."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LmmsModel")


# ---------------------------------------------------------------------------- model arguments
def positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"minivlm: model_args {name} must be a positive integer, got {value!r}")
    return number


# ---------------------------------------------------------------------------- requests
def as_image(visual, where: str):
    """A visual as `encode_prompt` takes it: a path stays a path (decoded by our load_image, as
    in eval.py); a decoded image becomes RGB."""
    if isinstance(visual, Image.Image):
        return visual if visual.mode == "RGB" else visual.convert("RGB")
    if isinstance(visual, (str, os.PathLike)):
        return Path(visual)
    raise ValueError(f"{where}: minivlm reads images (PIL images or paths), got "
                     f"{type(visual).__name__}")


def generation_settings(gen_kwargs: dict | None) -> tuple[int, list[str], bool]:
    """(max_new_tokens, stop strings, final_answer_only) from a task's generation_kwargs.

    final_answer_only (ours, default true): an output "<reasoning> ### The final answer is: X"
    is handed over as X, which is what a benchmark's scorer parses; a task that scores the
    marker itself (ours, over eval.py's file) sets it false. Decoding is always greedy."""
    kwargs = dict(gen_kwargs or {})
    max_new_tokens = positive_int(kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                                  "max_new_tokens")
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    final_answer_only = kwargs.pop("final_answer_only", True) not in (False, "false", "False", 0)
    if (float(kwargs.get("temperature") or 0) > 0 or kwargs.get("do_sample")
            or int(kwargs.get("num_beams") or 1) > 1):
        print("minivlm: greedy decoding only; the task's temperature / do_sample / num_beams "
              "are ignored", file=sys.stderr)
    return max_new_tokens, until, final_answer_only


def finish_answer(output: str, until: list[str], final_answer_only: bool) -> str:
    """The output cut at the first stop string, then its final answer when asked for."""
    for stop in until:
        if stop:
            output = output.split(stop)[0]
    if final_answer_only:
        _, answer = extract_final_answer(output)
        if answer is not None:
            return answer
    return output


# ---------------------------------------------------------------------------- the model
class LmmsModel(lmms):
    """A minivlm checkpoint behind lmms-eval's model interface. `--model_args`: pretrained=PATH
    (a checkpoint or run directory; required), device (default: CUDA when there is one),
    batch_size (default 8, eval.py's)."""

    is_simple = True  # takes (context, visuals) requests, not chat messages

    def __init__(self, pretrained: str = "", device: str | None = None,
                 batch_size: int | str = 8, quantize: str = "",
                 quantize_group_size: int | str = 64, **unknown):
        super().__init__()
        for name in HARNESS_ARGS:
            unknown.pop(name, None)
        if unknown:
            raise ValueError(f"minivlm: unknown model_args {', '.join(sorted(unknown))} "
                             "(expected pretrained=PATH, device, batch_size, quantize, "
                             "quantize_group_size)")
        if not pretrained:
            raise ValueError("minivlm: model_args needs pretrained=PATH, a minivlm checkpoint "
                             "or run directory")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("minivlm: run lmms-eval as one process (no accelerate or torchrun "
                             "launch): every process would answer every request")
        self.batch_size = positive_int(batch_size, "batch_size")
        try:
            self.device = resolve_device(device)  # None: "auto", as eval.py's default
        except ValueError as error:  # lmms-eval's log mixes every model's errors: say whose
            raise ValueError(f"minivlm: {error}") from None
        self.model, self.tokenizer, _ = load_vlm(pretrained, device=self.device, merge_lora=True)
        # model_args quantize=int8|int4 (and quantize_group_size=), as eval.py's --quantize
        prepare_quantized(self.model.eval(), quantize,
                          positive_int(quantize_group_size, "quantize_group_size"))
        self.processor = ImageProcessor.for_tower(self.model.vision)

    def _sample(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> Sample:
        """A request as the one-turn conversation eval.py builds from a record; a context
        without <image> placeholders (MMStar's, POPE's) gets one per image in front."""
        where = f"{task}/{split}/{doc_id}"
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        images = [as_image(visual, where) for visual in visuals or []]
        turns = add_placeholders([{"role": "user", "content": context}], len(images), where)
        return Sample(images=images, turns=turns, source=where)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers. Requests are grouped by their generation settings and otherwise kept
        in order, so that a task over eval.py's file gets eval.py's batches: left padding changes
        float sums, and other batches could flip a near-tie."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str),
                              []).append(index)
        results = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="minivlm answering", disable=self.rank != 0)
        for indices in groups.values():
            max_new_tokens, until, final_answer_only = generation_settings(
                requests[indices[0]].args[1])
            samples = [self._sample(requests[i].args[0], *requests[i].args[2:]) for i in indices]
            fits = self._fit_context(samples)
            progress.update(fits.count(False))
            outputs = iter(answer_samples(self.model, self.tokenizer, self.processor,
                                          [s for s, fit in zip(samples, fits) if fit],
                                          self.batch_size, max_new_tokens, progress))
            for index, fit in zip(indices, fits):
                if fit:
                    results[index] = finish_answer(next(outputs), until, final_answer_only)
        progress.close()
        return results

    def _fit_context(self, samples: list[Sample]) -> list[bool]:
        """Whether each prompt leaves room for an answer in the model's context. One that does
        not is answered with "" (wrong), named on stderr: eval.py stops at such an item, but a
        long benchmark run should not die at its one long question (a small model's context
        is 512 tokens)."""
        limit = self.model.lm.config.max_seq_len
        fits = [prompt_length(sample, self.tokenizer, self.processor,
                              self.model.image_tokens_per_tile) < limit for sample in samples]
        too_long = [sample.source for sample, fit in zip(samples, fits) if not fit]
        if too_long:
            print(f"minivlm: {len(too_long)} prompt(s) fill the context (max_seq_len={limit}) "
                  f"and get an empty answer: {', '.join(too_long[:5])}"
                  + (" ..." if len(too_long) > 5 else ""), file=sys.stderr)
        return fits

    def _scored_item(self, context: str, continuation, doc_to_visual, doc_id, task: str,
                     split: str) -> dict:
        """The prompt with the continuation as the assistant's answer, labelled on the
        continuation's tokens alone."""
        if callable(continuation):  # output_type: loglikelihood passes its doc_to_target
            continuation = continuation(self.task_dict[task][split][doc_id])
        sample = self._sample(context, doc_to_visual, doc_id, task, split)
        item = encode_prompt(sample, self.tokenizer, self.processor,
                             self.model.image_tokens_per_tile, answer=continuation)
        limit = self.model.lm.config.max_seq_len
        if len(item["input_ids"]) > limit:
            raise ValueError(f"{sample.source}: {len(item['input_ids'])} tokens (images "
                             f"included) exceed the model's context, max_seq_len={limit}")
        # encode_chat labels the answer and the end-of-turn marker after it (the model learns to
        # stop); lm-eval's log P(continuation | context) is over the continuation alone.
        labels = list(item["labels"])
        labels[max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)] = IGNORE_INDEX
        return dict(item, labels=labels)

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(negative log-likelihood of the continuation: minus the sum of its tokens'
        log-probabilities, whether each token is the argmax), wrapped: lmms-eval 0.7.3's
        evaluator turns any other tuple into its string
        (`unwrap_generation_output`), which breaks multiple_choice scoring, and hands a
        GenerationResult's payload on untouched. Right-padded batches as in training,
        log-softmax in fp32."""
        results = []
        progress = tqdm(total=len(requests), desc="minivlm scoring", disable=self.rank != 0)
        for chunk in batches(requests, self.batch_size):
            batch = collate([self._scored_item(*request.args) for request in chunk],
                            self.tokenizer.pad_id)
            input_ids = batch["input_ids"].to(self.device)
            pixels = batch["pixel_values"]
            embeds, _ = self.model.embed(input_ids, None if pixels is None
                                         else pixels.to(self.device))
            mask, positions = self.model.lm_mask(input_ids,
                                                 batch["attention_mask"].to(self.device))
            logits = self.model.lm(inputs_embeds=embeds, attention_mask=mask,
                                   position_ids=positions)
            # The logits at t predict the token at t + 1 (as VLM.forward's loss reads them).
            logits = logits[:, :-1].float()  # (B, T-1, V)
            targets = batch["labels"][:, 1:].to(self.device)  # (B, T-1)
            scored = targets != IGNORE_INDEX
            token_logprobs = logits.log_softmax(-1).gather(
                -1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
            nll = -torch.where(scored, token_logprobs, 0.0).sum(1)  # (B,)
            greedy = ((logits.argmax(-1) == targets) | ~scored).all(1)  # (B,)
            results += [GenerationResult(text=(float(n), bool(g)))
                        for n, g in zip(nll.tolist(), greedy.tolist())]
            progress.update(len(chunk))
        progress.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("minivlm: multi-round generation is not implemented (one "
                                  "question per request)")
