"""The training loop's settings (TrainConfig: every flag without a prefix) and the two decisions
made from them before the loop starts: the compute dtype and which parameters decay."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minivlm.data.images import MAX_IMAGE_PIXELS
from minivlm.ranges import above, at_least, between, check_ranges, one_of
from minivlm.train.fsdp import check_fsdp_flags


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
    # > 0: train for about this many seconds instead: the first --budget-probe-steps steps are
    # timed and fix the step count (and so the LR schedule) for the run; results.json and every
    # checkpoint record it (time_budget.py). --max-steps then only caps it.
    time_budget: float = field(default=0.0, metadata=at_least(0))
    budget_probe_steps: int = field(default=10, metadata=at_least(2))
    # draws of a --sample-rates mixture (with replacement); 0: max(examples, max_steps x batch),
    # or under --time-budget the examples (the step count is not known yet when it is drawn)
    mixture_draws: int = field(default=0, metadata=at_least(0))
    batch_size: int = field(default=16, metadata=at_least(1))  # per process and micro-batch
    grad_accum: int = field(default=1, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))
    min_lr: float = field(default=1e-4, metadata=at_least(0))
    # may exceed max_steps: the LR then only ramps up
    warmup_steps: int = field(default=20, metadata=at_least(0))
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    # AdamW's betas: (0.9, 0.95) as LISA's train_ds.py and nanoGPT (torch's default beta2: 0.999)
    adam_beta1: float = field(default=0.9, metadata=between(0, 1, high_open=True))
    adam_beta2: float = field(default=0.95, metadata=between(0, 1, high_open=True))
    # the decay after warmup (schedule.py): "cosine", or "linear" as LISA's DeepSpeed
    # WarmupDecayLR (which ends at 0: --lr-schedule linear --min-lr 0)
    lr_schedule: str = field(default="cosine", metadata=one_of("cosine", "linear"))
    # the vision tower's LR is --lr times this (a tower trained from scratch may want more
    # than the LM it feeds; a pretrained one less); 1 = one LR for every parameter
    vision_lr_scale: float = field(default=1.0, metadata=above(0))
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
    # DataLoader processes that decode images (train/loader.py): "auto" = none on the CPU (the
    # step has the cores), on CUDA one per core the rank has, up to 8; or a count
    num_workers: str = "auto"
    # decode every distinct image once up front and hold it (a small set; also proves that every
    # image decodes); else each item's images are decoded when it is drawn, in the workers
    preload_images: bool = False
    # processes that tokenise a data file while it is read: "auto" = one per core, up to 8;
    # 0 = this process (data/record_encoder.py)
    tokenize_workers: str = "auto"
    # where a read and tokenised JSON(L) data file is kept for the next run, keyed by the file,
    # its images and the tokenizer (data/record_index.py): "" = $MINIVLM_CACHE/data_index, else
    # ~/.cache/minivlm/data_index; "off" = never kept
    data_index_cache: str = ""
    cache_image_features: bool = False  # frozen tower: encode every image once, up front
    # where encoded images are kept between epochs and runs, keyed by image bytes, weights and
    # preprocessing (data/feature_cache.py): "" = $MINIVLM_CACHE or ~/.cache/minivlm/features
    feature_cache: str = ""
    # larger images are refused before decoding (data/images.py)
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata=at_least(1))

    def __post_init__(self):
        check_ranges(self)
        check_fsdp_flags(self)
        for flag, value in (("--num-workers", self.num_workers),
                            ("--tokenize-workers", self.tokenize_workers)):
            if not (str(value) == "auto" or str(value).isdigit()):
                raise ValueError(f"{flag} must be auto or a count >= 0, got {value!r}")
        if self.time_budget and self.budget_probe_steps > self.warmup_steps:
            # During warmup the LR is max_lr * (step + 1) / warmup_steps whatever the step count,
            # so the timed steps are the same steps a rerun with --max-steps N takes.
            raise ValueError(f"--time-budget times the first --budget-probe-steps "
                             f"{self.budget_probe_steps} steps, which must lie in the warmup "
                             f"(--warmup-steps {self.warmup_steps}): only there the LR does not "
                             "depend on the step count it fixes")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls are ~100x slower than fp32 on CPUs without AMX
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def param_groups(model: torch.nn.Module, weight_decay: float,
                 vision_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices (linear and embedding weights), not norms or biases (nanoGPT's rule). Each
    group's "lr_scale" multiplies the scheduled LR; with a vision scale other than 1 the tower's
    parameters get groups of their own."""
    def split(params: list, lr_scale: float) -> list[dict]:
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay,
                 "lr_scale": lr_scale},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0,
                 "lr_scale": lr_scale}]

    trainable = [p for p in model.parameters() if p.requires_grad]
    if vision_lr_scale == 1.0 or getattr(model, "vision", None) is None:
        return split(trainable, 1.0)
    tower = {id(p) for p in model.vision.parameters()}
    return (split([p for p in trainable if id(p) not in tower], 1.0)
            + split([p for p in trainable if id(p) in tower], vision_lr_scale))
