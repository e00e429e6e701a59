"""One rank of the 2-process gloo run behind tests/test_fsdp.py.

    python tests/_fsdp_worker.py OUT_DIR SHAPES_DIR TOKENIZER_DIR   (with torchrun's environment)

Runs the real Trainer on the tiny "test" VLM (with a mask decoder) over a mix of ReasonSeg
(masks) and SFT (no masks) examples, so on some steps one rank has masks and the other none:
  OUT_DIR/ddp/          DDP, STEPS steps
  OUT_DIR/fsdp/         FSDP, saved and validated (logits, on rank 0) at RESUME_AT and STEPS
  OUT_DIR/fsdp_ac/      FSDP with activation checkpointing
  OUT_DIR/resume/       FSDP resumed from fsdp/step RESUME_AT (its own optimizer shard)
  OUT_DIR/ddp_resume/   DDP resumed from fsdp/step RESUME_AT, consolidated first
  OUT_DIR/zero1_resume/ ZeRO-1 resumed from the same consolidated checkpoint
The test reads the checkpoints; what only a rank can see goes to OUT_DIR/rank{R}.pt.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from minivlm.consolidate import consolidate
from minivlm.data.batch import ChatDataset
from minivlm.data.images import ImageProcessor
from minivlm.data.readers import read_dataset
from minivlm.data.reasonseg import expand_referring_texts
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.models.build import build_vlm
from minivlm.models.presets import preset_config
from minivlm.train.distributed import barrier, cleanup, init_distributed
from minivlm.train.config import TrainConfig
from minivlm.train.trainer import Trainer
from minivlm.weights.checkpoint import LATEST

STEPS, RESUME_AT = 4, 2
PROBE_IDS = torch.arange(3, 19)[None]  # (1, 16): the token ids whose logits validation records


def build(tokenizer):
    torch.manual_seed(0)  # the same initial parameters for every run
    return build_vlm(preset_config("test", seg=True), tokenizer)


def copy_step(out_dir: Path, source: Path, env, consolidated: bool = False) -> None:
    """A run directory holding only `source` (a step directory), for a --resume from it."""
    if env.is_main:
        out_dir.mkdir()
        shutil.copytree(source, out_dir / source.name)
        (out_dir / LATEST).write_text(source.name)
        if consolidated:
            consolidate(out_dir)
    barrier(env)


def main(out: Path, shapes: Path, tokenizer_dir: Path) -> None:
    torch.set_num_threads(1)
    env = init_distributed(ddp=True, device_hint="cpu")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build(tokenizer)
    samples = (expand_referring_texts(read_dataset(shapes / "reasonseg" / "train"))[:8]
               + read_dataset(shapes / "sft.json")[:8])
    dataset = ChatDataset(samples, tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, model.config.lm.max_seq_len)
    run_config = {"stage": "test", "model": model.config.to_dict(), "lora": None}
    result: dict = {}

    def train(name, resume=False, validate=None, **flags):
        config = TrainConfig(out_dir=str(out / name), max_steps=STEPS, batch_size=2, lr=1e-2,
                             warmup_steps=1, min_lr=1e-3, device="cpu", ddp=True, log_every=100,
                             keep=0, resume=resume, **flags)
        torch.manual_seed(0)
        trainer = Trainer(build(tokenizer), tokenizer, dataset, config, env, run_config,
                          validate)
        if name == "ddp":  # which steps gave this rank masks
            batches = trainer.plan.from_micro_step(0)
            result["has_masks"] = [any(len(dataset[i]["masks"]) for i in next(batches))
                                   for _ in range(STEPS)]
        trainer.fit()

    def probe(m):  # rank 0 alone, while every rank waits in Trainer._validate
        result.setdefault("logits", []).append(m.lm(PROBE_IDS).detach().clone())
        return {"probe": float(result["logits"][-1].sum())}

    train("ddp")
    train("fsdp", fsdp=True, save_every=RESUME_AT, eval_every=RESUME_AT, validate=probe)
    train("fsdp_ac", fsdp=True, grad_checkpoint=True)
    saved = out / "fsdp" / f"step_{RESUME_AT:06d}"
    copy_step(out / "resume", saved, env)
    train("resume", resume=True, fsdp=True)
    copy_step(out / "ddp_resume", saved, env, consolidated=True)
    train("ddp_resume", resume=True)
    copy_step(out / "zero1_resume", saved, env, consolidated=True)
    train("zero1_resume", resume=True, zero1=True)

    torch.save(result, out / f"rank{env.rank}.pt")
    cleanup(env)


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
