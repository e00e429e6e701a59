"""The one training loop every stage shares (pretrain, SFT, segmentation), for 1 or N processes.

Per optimizer step: `grad_accum` micro-batches (with --pack, rows of several examples) under
autocast, each backward scaled by the GradScaler (active only for fp16); gradients all-reduced by
DDP on the last micro-batch only (no_sync before it), or reduce-scattered by FSDP after every one;
unscale, clip to the global norm, optimizer step (AdamW, ZeRO-1 or FSDP shards), cosine-warmup LR.
Data order is a pure function of (seed, epoch), so `--resume` continues bit-exactly.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from minivlm.data.batch import collate
from minivlm.data.packing import PackedRows, collate_packed
from minivlm.data.images import MAX_IMAGE_PIXELS
from minivlm.models.vlm import VLMConfig
from minivlm.ranges import above, at_least, check_ranges
from minivlm.train.activation_checkpointing import enable_activation_checkpointing
from minivlm.train.batch_plan import BatchPlan
from minivlm.train.checkpoint import (check_out_dir, config_differences, load_model_and_optimizer,
                                      read_trainer_state, restore_rng, save_checkpoint)
from minivlm.train.distributed import (DistributedEnv, all_reduce_mean, barrier, no_sync_if,
                                       wrap_ddp)
from minivlm.train.fsdp import check_fsdp_flags, shard_model, unsharded
from minivlm.train.resume_report import resume_changes
from minivlm.train.results import write_results
from minivlm.train.schedule import cosine_warmup_lr
from minivlm.train.zero import ZeRO1, clip_grad_norm_
from minivlm.weights.checkpoint import read_config, resolve_checkpoint


@dataclass
class TrainConfig:
    data: str = ""  # training data file(s), comma-separated (any format readers.py knows)
    image_dir: str = ""  # where image paths resolve ("" = each data file's folder)
    val_data: str = ""
    out_dir: str = "runs/sft"
    init_from: str = ""  # a previous stage's checkpoint (weights + tokenizer)
    resume: bool = False  # continue out_dir's latest checkpoint exactly
    overwrite: bool = False  # start over in an out_dir that holds checkpoints (else refused)
    train: str = "auto"  # parts to train: comma list of vision,projector,lm,seg or "auto"
    max_steps: int = field(default=300, metadata=at_least(1))
    batch_size: int = field(default=16, metadata=at_least(1))  # per process and micro-batch
    grad_accum: int = field(default=1, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))
    min_lr: float = field(default=1e-4, metadata=at_least(0))
    # may exceed max_steps: the LR then only ramps up
    warmup_steps: int = field(default=20, metadata=at_least(0))
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    grad_clip: float = field(default=1.0, metadata=at_least(0))  # 0 = no clipping
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast on CUDA; CPU runs fp32)
    device: str = "auto"
    seed: int = field(default=0, metadata=at_least(0))
    log_every: int = field(default=10, metadata=at_least(1))
    eval_every: int = field(default=0, metadata=at_least(0))  # 0 = only at the end
    save_every: int = field(default=0, metadata=at_least(0))  # 0 = only at the end
    keep: int = field(default=2, metadata=at_least(0))  # step directories to keep (0 = all)
    ddp: bool = False
    zero1: bool = False
    fsdp: bool = False  # with --ddp: shard parameters, gradients and AdamW state (fsdp.py)
    grad_checkpoint: bool = False
    compile: bool = False
    group_by_length: bool = False
    pack: bool = False  # several examples per row, up to max_seq_len (data/packing.py)
    skip_bad: bool = False
    num_workers: int = field(default=0, metadata=at_least(0))
    preload_images: bool = True  # decode every image once up front (also validates them)
    cache_image_features: bool = False  # frozen tower: encode every image once, up front
    # larger images are refused before decoding (data/images.py)
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata=at_least(1))

    def __post_init__(self):
        check_ranges(self)
        check_fsdp_flags(self)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls are ~100x slower than fp32 on CPUs without AMX
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights), not norms or biases (nanoGPT's rule)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


class Trainer:
    def __init__(self, model, tokenizer, train_set, config: TrainConfig, env: DistributedEnv,
                 run_config: dict, validate=None):
        self.config, self.env, self.tokenizer = config, env, tokenizer
        self.model = model.to(env.device)
        self.run_config = dict(run_config, train=asdict(config))
        # validate(model) -> {metric: value}, run on rank 0 every eval_every steps and at the end
        self.validate = validate
        self.dtype = resolve_dtype(config.dtype, env.device)
        if config.fsdp:  # before the optimizer: the parameters become DTensor shards
            shard_model(self.model, env, self.dtype)
        groups = param_groups(self.model, config.weight_decay)
        adamw = dict(lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
        self.optimizer = (ZeRO1(groups, torch.optim.AdamW, **adamw) if config.zero1
                          else torch.optim.AdamW(groups, **adamw))
        # fp16's 5-bit exponent underflows small gradients, so the loss is scaled up first. bf16
        # has fp32's 8-bit exponent range: nothing underflows and a scaler would only add work
        # (MiniMind-V's SFT script enables it for bf16 as well; it is harmless there, not needed).
        self.scaler = torch.amp.GradScaler(env.device.type,
                                           enabled=self.dtype == torch.float16)
        if config.grad_checkpoint:
            enable_activation_checkpointing(self.model)
        self.train_model = self.model
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        if env.distributed and not config.fsdp:
            # Unused parameters exist by design (e.g. the mask decoder on a batch without [SEG]).
            self.train_model = wrap_ddp(self.train_model, env, find_unused_parameters=True)
        self.train_set = train_set
        self.plan = BatchPlan(train_set.lengths(), config.batch_size, env, config.seed,
                              config.group_by_length,
                              pack_len=model.config.lm.max_seq_len if config.pack else 0,
                              names=train_set.sources() if config.pack else None)
        self.step = 0
        self.out_dir = Path(config.out_dir)
        check_out_dir(self.out_dir, config.resume, config.overwrite)
        if config.resume:
            self._resume()

    def _resume(self) -> None:
        ckpt = resolve_checkpoint(self.out_dir)
        saved = read_config(ckpt)
        # Through VLMConfig: a field newer than the checkpoint compares at its default.
        differences = config_differences(VLMConfig.from_dict(saved["model"]).to_dict(),
                                         self.run_config["model"])
        if differences:
            raise ValueError(f"{ckpt}: cannot resume, the model config differs: "
                             + "; ".join(differences[:5]))
        load_model_and_optimizer(ckpt, self.model, self.optimizer, self.env,
                                 zero1=self.config.zero1, fsdp=self.config.fsdp)
        state = read_trainer_state(ckpt)
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        restore_rng(ckpt, self.env)
        if self.env.is_main:
            print(f"resumed from {ckpt} at step {self.step}")
            for line in resume_changes(saved.get("train", {}), asdict(self.config), self.step):
                print(line)

    def _loader(self):
        pad_id = self.tokenizer.pad_id
        batches = self.plan.from_micro_step(self.step * self.config.grad_accum)
        dataset, collate_fn = ((PackedRows(self.train_set), collate_packed) if self.config.pack
                               else (self.train_set, collate))
        return iter(DataLoader(dataset, batch_sampler=batches,
                               collate_fn=functools.partial(collate_fn, pad_id=pad_id),
                               # its own generator: creating the iterator must not draw from the
                               # global RNG, or a resumed run's dropout masks would differ
                               generator=torch.Generator().manual_seed(self.config.seed),
                               num_workers=self.config.num_workers))

    def _to_device(self, batch: dict) -> dict:
        device = self.env.device
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
               for k, v in batch.items()}
        out["masks"] = [m.to(device) for m in batch["masks"]]
        return out

    def save(self) -> Path:
        return save_checkpoint(
            self.out_dir, self.step, model=self.model, config=self.run_config,
            tokenizer=self.tokenizer, trainer_state={"scaler": self.scaler.state_dict()},
            optimizer=self.optimizer, env=self.env, keep=self.config.keep,
            sharded_optimizer=self.config.zero1 or self.config.fsdp)

    def fit(self) -> dict:
        """Train to max_steps; returns the last logged scalars and validation metrics."""
        c, env = self.config, self.env
        writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        batches = self._loader()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # A progress bar on a terminal; in a log file, one line per --log-every steps instead.
        self.show_bar = env.is_main and sys.stderr.isatty()
        progress = tqdm(total=c.max_steps, initial=self.step, disable=not self.show_bar,
                        desc=self.out_dir.name, dynamic_ncols=True)
        self.started, self.start_step = time.time(), self.step
        totals = dict(tokens=0, images=0, seconds=0.0)  # optimizer steps only, for results.json
        window = dict(loss=0.0, bce=0.0, dice=0.0, masked=0, tokens=0, images=0, n=0,
                      t0=time.time())
        results: dict = {}
        self.model.train()
        while self.step < c.max_steps:
            step_started = time.time()
            lr = cosine_warmup_lr(self.step, max_lr=c.lr, warmup_steps=c.warmup_steps,
                                  total_steps=c.max_steps, min_lr=c.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(c.grad_accum):
                batch = self._to_device(next(batches))
                # DDP: only the last micro-batch all-reduces, the others accumulate (FSDP: each).
                with no_sync_if(self.train_model, micro < c.grad_accum - 1):
                    with torch.autocast(env.device.type, dtype=self.dtype,
                                        enabled=self.dtype != torch.float32):
                        out = self.train_model(**batch)
                    self.scaler.scale(out.loss / c.grad_accum).backward()
                window["loss"] += float(out.ce_loss) / c.grad_accum
                if out.mask_bce is not None:  # mask losses average over batches that had masks
                    window["bce"] += float(out.mask_bce)
                    window["dice"] += float(out.mask_dice)
                    window["masked"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                window["images"] += 0 if batch["pixel_values"] is None \
                    else batch["pixel_values"].shape[0]
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else math.inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            totals["seconds"] += time.time() - step_started
            self.step += 1
            window["n"] += 1
            progress.update(1)
            if self.step % c.log_every == 0 or self.step == c.max_steps:
                results.update(self._log(window, lr, float(grad_norm), writer, progress))
                totals["tokens"] += window["tokens"]
                totals["images"] += window["images"]
                window = dict(loss=0.0, bce=0.0, dice=0.0, masked=0, tokens=0, images=0, n=0,
                              t0=time.time())
            last = self.step == c.max_steps
            if self.validate is not None and ((c.eval_every and self.step % c.eval_every == 0)
                                              or last):
                results.update(self._validate(writer))
            if (c.save_every and self.step % c.save_every == 0) or last:
                self.save()
        progress.close()
        if writer is not None:
            writer.close()
        if env.is_main:  # last of the run's files: a directory holding results.json is finished
            write_results(self.out_dir, self.run_config["stage"], self.step, results, totals,
                          time.time() - self.started, env.world_size)
        return results

    def _log(self, window, lr, grad_norm, writer, progress) -> dict:
        seconds = max(time.time() - window["t0"], 1e-9)
        n = window["n"]
        scalars = {"train/loss": all_reduce_mean(window["loss"] / n, self.env),
                   "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": window["tokens"] * self.env.world_size / seconds,
                   "train/images_per_s": window["images"] * self.env.world_size / seconds}
        if self.model.seg_head is not None:
            # Collectives on every rank, whether or not its own batches had masks.
            masked = all_reduce_mean(float(window["masked"]), self.env)
            bce = all_reduce_mean(window["bce"], self.env)
            dice = all_reduce_mean(window["dice"], self.env)
            if masked > 0:
                scalars["train/mask_bce"], scalars["train/mask_dice"] = bce / masked, dice / masked
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, self.step)
            progress.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{lr:.1e}",
                                 tok_s=f"{scalars['train/tokens_per_s']:.0f}")
            if not self.show_bar:
                elapsed = time.time() - self.started
                steps_left = self.config.max_steps - self.step
                eta = elapsed / max(1, self.step - self.start_step) * steps_left
                mask = (f" bce {scalars['train/mask_bce']:.3f} "
                        f"dice {scalars['train/mask_dice']:.3f}"
                        if "train/mask_bce" in scalars else "")
                print(f"{self.out_dir.name} step {self.step}/{self.config.max_steps} "
                      f"loss {scalars['train/loss']:.3f}{mask} lr {lr:.1e} "
                      f"{scalars['train/tokens_per_s']:.0f} tok/s "
                      f"elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)
        return scalars

    def _validate(self, writer) -> dict:
        metrics = {}
        with unsharded(self.model):  # FSDP: rank 0 alone runs the model, so gather it first
            if self.env.is_main:
                self.model.eval()
                metrics = {f"val/{k}": v for k, v in self.validate(self.model).items()}
                self.model.train()
                for name, value in metrics.items():
                    writer.add_scalar(name, value, self.step)
                tqdm.write(f"step {self.step}: " + ", ".join(f"{k}={v:.3f}"
                                                              for k, v in metrics.items()))
            barrier(self.env)
        return metrics
