"""Sequence packing vs padding: real (non-pad) training tokens per second.

    python bench/pack.py                          # demo model, both workloads, CPU or CUDA
    python bench/pack.py --examples 1000 --rounds 10 --json runs/pack.json
    python bench/pack.py --rounds 16              # the README's figures (run on a quiet machine)

Three ways to batch the same examples, each run through the trainer's own BatchPlan and collate:
  padded   random batches of --batch-size examples, padded to the longest (the default)
  grouped  --group-by-length: similar lengths share a batch, so less padding
  packed   --pack: first-fit-decreasing rows of up to max_seq_len, each sample attending only
           to itself (CPU: one SDPA call per sample, DocumentSpans; CUDA: FlexAttention)
A step is forward + loss + backward + AdamW step of a demo-preset VLM (models/presets.py), fp32 on
CPU, bf16 autocast on CUDA. Packed steps take ceil(batch x mean length / max_seq_len) rows, so
every mode sees about the same examples per step. The modes alternate step by step, so load from
other programs falls on all of them alike; each reports its real tokens over its total time.
Workloads:
  shapes   the demo's SFT data (minivlm.data.shapes, generated into a temporary folder)
  longtail LLaVA-like: one image (or none, 10%), a short question, an answer whose length is
           lognormal (median ~30 tokens, a long tail cut at max_seq_len), as in LLaVA-665k
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.constants import IGNORE_INDEX  # noqa: E402
from minivlm.data.batch import ChatDataset, collate  # noqa: E402
from minivlm.data.images import ImageProcessor  # noqa: E402
from minivlm.data.packing import PackedRows, collate_packed  # noqa: E402
from minivlm.data.readers import read_dataset  # noqa: E402
from minivlm.data.shapes.config import ShapesConfig  # noqa: E402
from minivlm.data.shapes.generate import generate  # noqa: E402
from minivlm.data.load_tokenizer import load_tokenizer  # noqa: E402
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece  # noqa: E402
from minivlm.devices import add_device_arg, resolve_device  # noqa: E402
from minivlm.models.build import build_vlm  # noqa: E402
from minivlm.models.presets import preset_config  # noqa: E402
from minivlm.train.batch_plan import BatchPlan  # noqa: E402
from minivlm.train.distributed import init_distributed  # noqa: E402
from minivlm.train.config import resolve_dtype  # noqa: E402
from minivlm.train_tokenizer import dataset_texts  # noqa: E402

MODES = ("padded", "grouped", "packed")


class Items(torch.utils.data.Dataset):
    """Ready training items (what ChatDataset.__getitem__ returns) held in a list."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


def shapes_items(folder: Path, tokenizer, model, count: int) -> Items:
    generate(folder, seed=0, config=ShapesConfig(num_train_images=count,
                                                 num_train_pairs=count // 8, num_val=0,
                                                 num_test=0, num_seg_train=0, num_seg_val=0,
                                                 num_seg_test=0))
    samples = read_dataset(str(folder / "sft.json"))[:count]
    dataset = ChatDataset(samples, tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, model.config.lm.max_seq_len)
    return Items([dataset[i] for i in range(len(dataset))])


def longtail_items(tokenizer, model, count: int, seed: int = 0) -> Items:
    """Token ids drawn at random (what they say does not change the cost); labels on answers."""
    rng = np.random.default_rng(seed)
    size, per_tile = model.config.vision.image_size, model.image_tokens_per_tile
    max_len, vocab = model.config.lm.max_seq_len, tokenizer.vocab_size
    specials = {tokenizer.image_token_id, tokenizer.seg_token_id, tokenizer.pad_id}
    words = np.array([t for t in range(vocab) if t not in specials])
    items = []
    for _ in range(count):
        has_image = rng.random() > 0.1
        question = int(rng.integers(8, 24))
        answer = int(min(max_len - question - per_tile, 2 + rng.lognormal(np.log(30), 1.0)))
        image = [tokenizer.image_token_id] * (per_tile if has_image else 0)
        prompt = image + rng.choice(words, question).tolist()
        reply = rng.choice(words, answer).tolist()
        items.append(dict(input_ids=prompt + reply, labels=[IGNORE_INDEX] * len(prompt) + reply,
                          pixel_values=[torch.rand(1, 3, size, size)] if has_image else [],
                          masks=[], source="longtail"))
    return Items(items)


def loaders(items: Items, batch: int, pad_id: int, max_len: int) -> tuple[dict, int]:
    """An endless micro-batch iterator per mode, from the trainer's own BatchPlan and collate."""
    env, lengths = init_distributed(False, "cpu"), items.lengths()
    rows = math.ceil(batch * float(np.mean(lengths)) / max_len)
    plans = {"padded": BatchPlan(lengths, batch, env, 0, False),
             "grouped": BatchPlan(lengths, batch, env, 0, True),
             "packed": BatchPlan(lengths, rows, env, 0, False, pack_len=max_len)}
    def batches(plan, dataset, collate_fn):
        for keys in plan.from_micro_step(0):
            yield collate_fn([dataset[key] for key in keys], pad_id)
    return {mode: batches(plan, *((PackedRows(items), collate_packed) if mode == "packed"
                                  else (items, collate)))
            for mode, plan in plans.items()}, rows


def train_step(model, optimizer, batch: dict, device, dtype) -> int:
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def bench(name: str, items: Items, model, args, device, dtype) -> dict:
    max_len = model.config.lm.max_seq_len
    batches, rows = loaders(items, args.batch_size, args.pad_id, max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = dict.fromkeys(MODES, 0)
    seconds = dict.fromkeys(MODES, 0.0)
    width = dict.fromkeys(MODES, 0)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for mode in MODES:
            batch = next(batches[mode])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            real = train_step(model, optimizer, batch, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                tokens[mode] += real
                seconds[mode] += time.perf_counter() - start
                width[mode] += batch["input_ids"].numel()
    lengths = items.lengths()
    result = dict(examples=len(lengths), mean_len=float(np.mean(lengths)),
                  max_len=max(lengths), batch=args.batch_size, packed_rows=rows)
    for mode in MODES:
        result[f"{mode}_tok_s"] = tokens[mode] / seconds[mode]
        result[f"{mode}_real_fraction"] = tokens[mode] / width[mode]
    result["packed_vs_padded"] = result["packed_tok_s"] / result["padded_tok_s"]
    result["packed_vs_grouped"] = result["packed_tok_s"] / result["grouped_tok_s"]
    result["grouped_vs_padded"] = result["grouped_tok_s"] / result["padded_tok_s"]
    print(f"{name}: {len(lengths)} examples, mean {result['mean_len']:.0f} tokens, "
          f"max {result['max_len']}; batch {args.batch_size} (packed: {rows} rows of {max_len})")
    for mode in MODES:
        print(f"  {mode:8s} {result[f'{mode}_tok_s']:9.0f} real tok/s   "
              f"{100 * result[f'{mode}_real_fraction']:5.1f}% of the batch is real tokens")
    print(f"  packed / padded {result['packed_vs_padded']:.2f}x   packed / grouped "
          f"{result['packed_vs_grouped']:.2f}x   grouped / padded "
          f"{result['grouped_vs_padded']:.2f}x", flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="shapes,longtail")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--preset", default="demo", help="models/presets.py")
    add_device_arg(parser)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    # Other programs' load slows every mode alike but makes each figure noisy: say what it was
    # (the 1-minute load average before this run's own work adds to it).
    load = os.getloadavg()[0]
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    folder = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    generate(folder / "text", seed=0, config=ShapesConfig.quick())
    train_sentencepiece(dataset_texts([str(folder / "text" / "sft.json")]) * 4,
                        folder / "tokenizer", vocab_size=360)
    tokenizer = load_tokenizer(folder / "tokenizer")
    args.pad_id = tokenizer.pad_id
    torch.manual_seed(0)
    model = build_vlm(preset_config(args.preset), tokenizer).to(device).train()
    print(f"device {device} ({dtype}), {torch.get_num_threads()} threads, preset {args.preset}, "
          f"load average {load:.1f} before the run")
    results = {}
    for name in filter(None, args.workloads.split(",")):
        items = (shapes_items(folder / "shapes", tokenizer, model, args.examples)
                 if name == "shapes" else longtail_items(tokenizer, model, args.examples))
        results[name] = bench(name, items, model, args, device, dtype)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
