"""The one training loop every stage shares (pretrain, SFT, segmentation), for 1 or N processes.

Per optimizer step: `grad_accum` micro-batches (with --pack, rows of several examples) under
autocast, each backward scaled by the GradScaler (active only for fp16); gradients all-reduced by
DDP on the last micro-batch only (no_sync before it), or reduce-scattered by FSDP after every one;
unscale, clip to the global norm, optimizer step (AdamW, ZeRO-1 or FSDP shards), cosine-warmup LR.
Data order is a pure function of (seed, epoch), so `--resume` continues bit-exactly; a stream of
shards (stream_set.py) resumes from the reader positions saved in trainer_state.json.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from minivlm.data.mixture import MixtureDataset
from minivlm.models.vlm import VLMConfig
from minivlm.train.activation_checkpointing import enable_activation_checkpointing
from minivlm.train.checkpoint import (check_out_dir, config_differences, load_model_and_optimizer,
                                      read_trainer_state, restore_rng, save_checkpoint)
from minivlm.train.config import TrainConfig, param_groups, resolve_dtype
from minivlm.train.distributed import (DistributedEnv, barrier, broadcast_int, no_sync_if,
                                       wrap_ddp)
from minivlm.train.fsdp import shard_model, unsharded
from minivlm.train.loader import batch_plan, trainer_batches
from minivlm.train.resume_report import resume_changes
from minivlm.train.results import write_results
from minivlm.train.schedule import SCHEDULES
from minivlm.train.step_log import StepWindow, step_line
from minivlm.train.stream_set import StreamSet
from minivlm.train.time_budget import StepBudget
from minivlm.train.zero import ZeRO1, clip_grad_norm_
from minivlm.weights.checkpoint import read_config, resolve_checkpoint


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
        groups = param_groups(self.model, config.weight_decay, config.vision_lr_scale)
        adamw = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=1e-8)
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
        self.plan = batch_plan(train_set, config, env, model.config.lm.max_seq_len)
        self.step = 0
        # The step count: --max-steps, or the one --time-budget fixes after its probe steps
        # (until then --max-steps caps the loop; the probe's LR does not depend on it).
        self.max_steps = config.max_steps
        self.budget = (StepBudget(config.time_budget, config.budget_probe_steps,
                                  config.max_steps) if config.time_budget else None)
        self.curve: list[dict] = []  # every validation: step, training seconds, metrics
        self.train_seconds = 0.0  # the optimizer steps' seconds since step 0 (resumes included)
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
        # Optimizer.load_state_dict also restores the saved groups' hyperparameters; this
        # run's flags (betas, weight decay) must win, as resume_report.py says they do.
        flags = [{k: v for k, v in g.items() if k != "params"}
                 for g in self.optimizer.param_groups]
        load_model_and_optimizer(ckpt, self.model, self.optimizer, self.env,
                                 zero1=self.config.zero1, fsdp=self.config.fsdp)
        for group, settings in zip(self.optimizer.param_groups, flags):
            group.update(settings)
        state = read_trainer_state(ckpt)
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        budget = state.get("budget")
        if self.budget is not None and not budget and self.step > 0:
            raise ValueError(f"{ckpt}: --time-budget times a run's first steps; this run is at "
                             f"step {self.step} without one (resume it without --time-budget)")
        if budget:  # the count its probe fixed stays, with or without --time-budget now
            if self.budget is not None:
                self.budget.load_state_dict(budget)
            self.max_steps = budget["steps"] or self.max_steps
        self.curve = state.get("curve", [])
        self.train_seconds = state.get("train_seconds", 0.0)
        if isinstance(self.train_set, StreamSet):  # before the loader's workers start
            self.train_set.resume(state.get("stream"), ckpt)
        restore_rng(ckpt, self.env)
        if self.env.is_main:
            print(f"resumed from {ckpt} at step {self.step}")
            for line in resume_changes(saved.get("train", {}), asdict(self.config), self.step):
                print(line)

    def _loader(self):
        return trainer_batches(self.train_set, self.plan, self.config, self.env.device,
                               self.tokenizer.pad_id, self.step * self.config.grad_accum)

    def _to_device(self, batch: dict) -> dict:
        device = self.env.device
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
               for k, v in batch.items()}
        out["masks"] = [m.to(device) for m in batch["masks"]]
        return out

    def save(self) -> Path:
        return save_checkpoint(
            self.out_dir, self.step, model=self.model, config=self.run_config,
            tokenizer=self.tokenizer,
            trainer_state={"scaler": self.scaler.state_dict(), "max_steps": self.max_steps,
                           "curve": self.curve, "train_seconds": self.train_seconds,
                           "budget": self.budget.state_dict() if self.budget else None,
                           # a stream's reader positions (a collective: every rank saves)
                           "stream": (self.train_set.state(self.env)
                                      if isinstance(self.train_set, StreamSet) else None)},
            optimizer=self.optimizer, env=self.env, keep=self.config.keep,
            sharded_optimizer=self.config.zero1 or self.config.fsdp)

    def fit(self) -> dict:
        """Train to the step count; returns the last logged scalars and validation metrics."""
        c, env = self.config, self.env
        writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        batches = self._loader()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # A progress bar on a terminal; in a log file, one line per --log-every steps instead.
        self.show_bar = env.is_main and sys.stderr.isatty()
        progress = tqdm(total=self.max_steps, initial=self.step, disable=not self.show_bar,
                        desc=self.out_dir.name, dynamic_ncols=True)
        self.started, self.start_step = time.time(), self.step
        totals = dict(tokens=0, images=0, seconds=0.0)  # optimizer steps only, for results.json
        window = StepWindow()
        results: dict = {}
        self.model.train()
        while self.step < self.max_steps:
            step_started = time.time()
            if self.budget is not None:
                self.budget.begin_step()
            lr = SCHEDULES[c.lr_schedule](self.step, max_lr=c.lr, warmup_steps=c.warmup_steps,
                                          total_steps=self.max_steps, min_lr=c.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for micro in range(c.grad_accum):
                batch = self._to_device(next(batches))
                # DDP: only the last micro-batch all-reduces, the others accumulate (FSDP: each).
                with no_sync_if(self.train_model, micro < c.grad_accum - 1):
                    with torch.autocast(env.device.type, dtype=self.dtype,
                                        enabled=self.dtype != torch.float32):
                        out = self.train_model(**batch)
                    self.scaler.scale(out.loss / c.grad_accum).backward()
                window.add_micro_batch(out, batch, c.grad_accum)
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else math.inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            totals["seconds"] += time.time() - step_started
            self.train_seconds += time.time() - step_started
            self.step += 1
            window.steps += 1
            progress.update(1)
            if self.budget is not None and (fixed := self._fixed_by_budget()):
                progress.total = fixed
            if self.step % c.log_every == 0 or self.step == self.max_steps:
                results.update(self._log(window, lr, float(grad_norm), writer, progress))
                totals["tokens"] += window.tokens
                totals["images"] += window.images
                window = StepWindow()
            last = self.step == self.max_steps
            if self.validate is not None and ((c.eval_every and self.step % c.eval_every == 0)
                                              or last):
                results.update(self._validate(writer))
            if (c.save_every and self.step % c.save_every == 0) or last:
                self.save()
        progress.close()
        if writer is not None:
            writer.close()
        if env.is_main:  # last of the run's files: a directory holding results.json is finished
            extra = {"curve": self.curve}
            if self.budget is not None:
                extra["budget"] = dict(self.budget.state_dict(), rerun=self._rerun_flags())
            write_results(self.out_dir, self.run_config["stage"], self.step, results, totals,
                          time.time() - self.started, env.world_size, extra)
        return results

    def _fixed_by_budget(self) -> int | None:
        """The step count, on the step where the budget's probe fixes it (else None). Every
        rank must stop on the same step: rank 0's count is broadcast."""
        fixed = self.budget.end_step()
        if fixed is None:
            return None
        self.max_steps = self.budget.fix(broadcast_int(fixed, self.env))
        if self.env.is_main:
            tqdm.write(f"--time-budget {self.config.time_budget:g}s: "
                       f"{self.budget.seconds_per_step:.3f} s/step over probe steps 2-"
                       f"{self.config.budget_probe_steps} -> {self.max_steps} steps "
                       f"(rerun exactly with {self._rerun_flags()})")
        return self.max_steps

    def _rerun_flags(self) -> str:
        """The flags that repeat this run without a clock (a mixture's draws were counted from
        its files, not from the step count the rerun names)."""
        mixed = isinstance(self.train_set, MixtureDataset)
        return f"--max-steps {self.max_steps}" + (f" --mixture-draws {len(self.train_set)}"
                                                  if mixed else "")

    def _log(self, window: StepWindow, lr, grad_norm, writer, progress) -> dict:
        scalars = window.scalars(lr, grad_norm, self.env, self.model.seg_head is not None)
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, self.step)
            progress.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{lr:.1e}",
                                 tok_s=f"{scalars['train/tokens_per_s']:.0f}")
            if not self.show_bar:
                print(step_line(self.out_dir.name, self.step, self.max_steps, scalars,
                                time.time() - self.started, self.step - self.start_step),
                      flush=True)
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
                    # the same curve over training time (milliseconds of optimizer steps, as
                    # TensorBoard's x-axis is an integer): runs of unequal speed side by side
                    writer.add_scalar(f"{name}@train_ms", value, int(self.train_seconds * 1000))
                self.curve.append(dict(step=self.step, seconds=self.train_seconds,
                                       **{k[len("val/"):]: v for k, v in metrics.items()}))
                tqdm.write(f"step {self.step}: " + ", ".join(f"{k}={v:.3f}"
                                                              for k, v in metrics.items()))
            barrier(self.env)
        return metrics
