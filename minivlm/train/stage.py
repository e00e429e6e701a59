"""What the three training scripts share: their flags, the model they start from, their data.

Flags come from the config dataclasses (cli.py): TrainConfig (no prefix), VisionConfig
(--vision-*), ProjectorConfig (--projector-*), TransformerConfig (--lm-*), SegConfig (--seg-*),
ImageTokensConfig (--image-*), LoRAConfig (--lora-*). `--model-preset NAME` (models/presets.py)
and `--lm-preset NAME` (transformer.PRESETS) change the size flags' defaults; a size flag given
explicitly still wins.
A stage starts from one of:
  --init-from CKPT    the previous stage's checkpoint (weights + tokenizer; LoRA merged in)
  --lm-gguf FILE      a real language model from a GGUF file (its tokenizer too)
  --lm-hf DIR         a real language model from a Hugging Face checkpoint directory
  --tokenizer DIR     a fresh, randomly initialised model sized by the --lm-* flags
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minivlm.cli import add_config_args, checked_values, config_from_args, set_config_defaults
from minivlm.data.images import ImageProcessor
from minivlm.data.load_data import (DataOptions, index_settings, load_chat_dataset,
                                    uses_index)
from minivlm.data.mixture import MixtureDataset
from minivlm.data.record_index import default_index_root
from minivlm.data.seg_data_config import SegDataConfig
from minivlm.data.skipped import skip_summary, skipped_record, write_skipped
from minivlm.data.hf_tokenizer import load_hf_tokenizer
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.load import load_gguf, load_vlm
from minivlm.lora import apply_lora
from minivlm.models.attention_mask import ImageTokensConfig
from minivlm.models.build import attach_seg_head, build_vlm
from minivlm.models.presets import LM_PRESETS, MODEL_PRESETS, preset_overrides
from minivlm.models.seg_head import SegConfig
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.models.vision import VisionConfig
from minivlm.models.vlm import VLM, ProjectorConfig, VLMConfig
from minivlm.quant.checkpoint import quant_record
from minivlm.quant.swap import add_quantize_args, quantize_model
from minivlm.ranges import above, at_least, between, check_ranges
from minivlm.train.checkpoint import check_out_dir
from minivlm.train.distributed import DistributedEnv, barrier, init_distributed
from minivlm.train.image_features import seg_image_cache, tower_feature_cache, warm
from minivlm.train.loader import loader_workers, tokenize_workers
from minivlm.train.stream_set import StreamSet, load_stream, refuse_flags, stream_source
from minivlm.train.trainable import set_trainable, trainable_table
from minivlm.train.config import TrainConfig


@dataclass
class LoRAConfig:
    r: int = field(default=0, metadata=at_least(0))  # 0 = no adapters: --train's parts train fully
    alpha: float = field(default=16.0, metadata=above(0))
    dropout: float = field(default=0.05, metadata=between(0, 1, high_open=True))
    targets: str = "attn,mlp"  # module names, groups (attn, mlp, all-linear), re:...
    train_extra: str = ""  # modules trained fully beside the adapters, comma-separated

    def __post_init__(self):
        check_ranges(self)


@dataclass
class SourceConfig:
    tokenizer: str = ""
    lm_gguf: str = ""
    lm_hf: str = ""


def _split(names: str) -> tuple[str, ...]:
    return tuple(filter(None, names.split(",")))


def parse_args(description: str, argv=None, train_defaults: dict | None = None,
               lora_defaults: dict | None = None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-preset", default="", choices=sorted(MODEL_PRESETS),
                        help="sizes of the whole model (models/presets.py)")
    parser.add_argument("--lm-preset", default="", choices=sorted(LM_PRESETS),
                        help="the language model's shape (transformer.PRESETS)")
    add_config_args(parser, TrainConfig, defaults=train_defaults)
    add_config_args(parser, SourceConfig)
    add_config_args(parser, VisionConfig, "vision")
    add_config_args(parser, ProjectorConfig, "projector")
    add_config_args(parser, TransformerConfig, "lm")
    add_config_args(parser, SegConfig, "seg")
    add_config_args(parser, ImageTokensConfig, "image")
    add_config_args(parser, SegDataConfig, "seg_data")  # LISA's seg readers (--seg-data-*)
    add_config_args(parser, LoRAConfig, "lora", defaults=lora_defaults)
    add_quantize_args(parser)  # QLoRA: a frozen int8/int4 LM under the adapters (minivlm/quant/)
    parser.add_argument("--train-extra", dest="lora_train_extra", default=argparse.SUPPRESS,
                        help="alias of --lora-train-extra")
    parser.add_argument("--sample-rates", default="",
                        help="comma-separated weights, one per --data file: each step draws "
                             "examples from the files in these proportions (LISA)")
    parser.add_argument("--hf-columns", default="",
                        help="a Hugging Face dataset's columns for our fields, e.g. "
                             "image=img,conversations=conv (data/hf_datasets.py)")
    parser.add_argument("--val-limit", type=int, default=200,
                        help="validation items evaluated every --eval-every steps")
    parser.add_argument("--val-max-new-tokens", type=int, default=32,
                        help="longest validation answer (a reasoning or a description is long)")
    args = parser.parse_args(argv)
    presets = preset_overrides(args.model_preset, args.lm_preset)
    if presets:  # parse again with the presets' sizes as defaults, so explicit flags win
        for prefix, values in presets.items():
            set_config_defaults(parser, prefix, values)
        args = parser.parse_args(argv)
    args.train_config = config_from_args(args, TrainConfig)
    args.source = config_from_args(args, SourceConfig)
    args.lora_config = config_from_args(args, LoRAConfig, "lora")
    args.seg_data = config_from_args(args, SegDataConfig, "seg_data")
    if args.quantize and args.lora_config.r == 0:
        raise ValueError(f"--quantize {args.quantize} freezes the LM's Linears: pass --lora-r N "
                         "too, so that adapters train on the quantised base")
    # The model's flags become configs only in prepare_model (and never with --init-from):
    # check their ranges now, so a bad value stops the script before anything is loaded.
    for config_class, prefix in ((VisionConfig, "vision"), (ProjectorConfig, "projector"),
                                 (TransformerConfig, "lm"), (SegConfig, "seg"),
                                 (ImageTokensConfig, "image")):
        checked_values(args, config_class, prefix)
    config_from_args(args, SegConfig, "seg")  # and the choices that go together (SegConfig)
    for flag, value in (("--val-limit", args.val_limit),
                        ("--val-max-new-tokens", args.val_max_new_tokens)):
        if value < 1:  # plain flags, not config fields: their ranges are checked here
            raise ValueError(f"{flag} must be >= 1, got {value}")
    return args


def prepare_model(args, env: DistributedEnv, stage: str, auto_parts: set[str],
                  with_seg: bool = False):
    """(model, tokenizer, run_config) with the right parameters trainable (trainable.py decides);
    the main rank prints what trains as a table."""
    train, source = args.train_config, args.source
    seg_config = config_from_args(args, SegConfig, "seg")
    seg_config.enabled = seg_config.enabled or with_seg
    pretrained_parts = set()
    if train.init_from:
        model, tokenizer, _ = load_vlm(train.init_from, merge_lora=True)
        # A tower that started from random weights keeps learning in every stage; a pretrained
        # CLIP tower stays frozen unless --train names it (LLaVA's recipe).
        pretrained_parts = {"projector", "lm"} | ({"vision"} if model.config.vision.pretrained
                                                  else set())
        if seg_config.enabled and model.seg_head is None:  # e.g. seg stage after SFT
            attach_seg_head(model, seg_config)
    else:
        lm = None
        if source.lm_gguf:
            lm, tokenizer = load_gguf(source.lm_gguf)
            pretrained_parts.add("lm")
        elif source.lm_hf:
            lm, tokenizer = Transformer.from_hf(source.lm_hf), load_hf_tokenizer(source.lm_hf)
            pretrained_parts.add("lm")
        elif source.tokenizer:
            tokenizer = load_tokenizer(source.tokenizer)
        else:
            raise ValueError("pass --init-from CKPT, --lm-gguf FILE, --lm-hf DIR or "
                             "--tokenizer DIR")
        vision = config_from_args(args, VisionConfig, "vision")
        if vision.pretrained:
            pretrained_parts.add("vision")
        config = VLMConfig(lm=config_from_args(args, TransformerConfig, "lm"), vision=vision,
                           projector=config_from_args(args, ProjectorConfig, "projector"),
                           seg=seg_config,
                           image_tokens=config_from_args(args, ImageTokensConfig, "image"))
        model = build_vlm(config, tokenizer, lm=lm)
    lora = args.lora_config
    run_config = {"stage": stage, "model": model.config.to_dict(), "lora": None}
    if args.quantize:  # reference path: the packed kernels have no backward
        quantize_model(model, args.quantize, args.quantize_group_size, kernels=False,
                       verbose=env.is_main)
        run_config["quantize"] = quant_record(args.quantize, args.quantize_group_size)
    if lora.r > 0:
        # Adapters go on the language model only, as LISA does (the mask decoder's attention
        # also has q_proj/k_proj/v_proj, but it trains fully when it trains at all).
        apply_lora(model.lm, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   targets=_split(lora.targets))
        run_config["lora"] = dict(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                  targets=_split(lora.targets))
    parts = set_trainable(model, train.train, stage_parts=auto_parts, pretrained=pretrained_parts,
                          lora_extras=_split(lora.train_extra))
    if env.is_main:
        adapters = (f"; LoRA r={lora.r} on {lora.targets}, extras: {lora.train_extra or '-'}"
                    if lora.r > 0 else "")
        print(f"[{stage}] --train {train.train}: {', '.join(sorted(parts)) or '-'}{adapters}\n"
              + trainable_table(model))
    return model, tokenizer, run_config


def data_options(train: TrainConfig, seg_data: SegDataConfig, expand_texts: bool = False,
                 hf_columns: str = "") -> DataOptions:
    """How this stage reads its --data entries, from its flags."""
    index_root = (None if train.data_index_cache == "off" else
                  Path(train.data_index_cache) if train.data_index_cache else default_index_root())
    return DataOptions(image_dir=train.image_dir or None, seg_data=seg_data,
                       expand_texts=expand_texts, skip_bad=train.skip_bad,
                       max_image_pixels=train.max_image_pixels,
                       tokenize_workers=tokenize_workers(train.tokenize_workers),
                       index_root=index_root, hf_columns=hf_columns)


def load_training_data(paths: str, args, model: VLM, tokenizer, env: DistributedEnv,
                       expand_texts: bool = False):
    """One ChatDataset per comma-separated path; errors stop here, before the first step.
    `expand_texts`: a ReasonSeg sample becomes one example per referring text. A file that is
    indexed is read by rank 0 first; the other ranks then map its index (data/load_data.py)."""
    train = args.train_config
    processor = ImageProcessor.for_tower(model.vision)
    entries = list(filter(None, paths.split(",")))
    if any(stream_source(entry) is not None for entry in entries):  # shards (stream_set.py)
        refuse_flags(train, args.sample_rates, entries)
        return [load_stream(entries[0], train, args.hf_columns,
                            loader_workers(train.num_workers, env.device), env, tokenizer,
                            processor, model.image_tokens_per_tile, model.config.lm.max_seq_len)]
    tower_cache = tower_feature_cache(model, processor, train, env)
    seg_cache = seg_image_cache(model, train, env)
    options = data_options(train, args.seg_data, expand_texts, args.hf_columns)
    sizes = (model.image_tokens_per_tile, model.config.lm.max_seq_len)
    settings = (index_settings(tokenizer, processor, *sizes, options)
                if options.index_root is not None else None)
    datasets, skipped_all = [], []
    for path in entries:
        started = time.time()
        serial = uses_index(path, options)  # rank 0 indexes it; the others then map that
        if env.is_main or not serial:
            dataset, origin = load_chat_dataset(path, tokenizer, processor, *sizes, options,
                                                settings)
        if serial:
            barrier(env)
            if not env.is_main:
                dataset, origin = load_chat_dataset(path, tokenizer, processor, *sizes,
                                                    options, settings)
        warm(tower_cache, dataset.image_paths(), env)
        warm(seg_cache, dataset.seg_image_paths(), env)
        if train.preload_images or tower_cache is not None or seg_cache is not None:
            dataset.prepare_images(train.preload_images, tower_cache, seg_cache)
        if train.skip_bad:  # what fails only when decoded is added to the same list
            dataset.late_skip_log = (Path(train.out_dir) / "skipped.jsonl", path)
        skipped = [skipped_record(path, message) for message in dataset.errors]
        skipped_all += skipped
        if env.is_main:
            print(f"data {path}: {len(dataset)} examples"
                  + (f", {len(skipped)} bad records skipped:\n{skip_summary(skipped)}"
                     if skipped else ""))
            print(f"  {origin}, {time.time() - started:.1f} s"
                  + (", images preloaded" if train.preload_images else ""))
        datasets.append(dataset)
    for name, cache in (("vision features", tower_cache), ("SAM image embeddings", seg_cache)):
        if cache is not None and env.is_main:
            print(f"{name}: {cache.misses} image(s) encoded now, the rest read from "
                  f"{cache.directory}")
    if train.skip_bad and env.is_main:
        write_skipped(Path(train.out_dir) / "skipped.jsonl", skipped_all)
        if skipped_all:
            print(f"every skipped record, with its reason: {train.out_dir}/skipped.jsonl")
    return datasets


def start(args) -> DistributedEnv:
    c = args.train_config
    # Refuse a rerun into a finished run before minutes of loading (the Trainer checks again).
    check_out_dir(c.out_dir, c.resume, c.overwrite)
    env = init_distributed(c.ddp, c.device)
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(args.train_config.seed)
    return env


def training_set(datasets: list, args, env: DistributedEnv, always_mix: bool = False):
    """The one dataset a stage trains on: a single --data file as it is (epochs in a shuffled
    order), several drawn in the --sample-rates proportions (LISA's hybrid data; equal rates when
    none are given). `always_mix`: draw even from a single file (train_seg.py, as LISA)."""
    c = args.train_config
    if len(datasets) == 1 and not args.sample_rates and not always_mix:
        return datasets[0]
    if isinstance(datasets[0], StreamSet):  # refuse_flags stopped the other ways here
        raise ValueError(f"{datasets[0].name}: this stage draws a mixture, which a stream of "
                         "shards cannot be part of (it has no length); give a JSON or HF dataset")
    rates = ([float(r) for r in args.sample_rates.split(",")] if args.sample_rates
             else [1.0] * len(datasets))
    examples = sum(map(len, datasets))
    # Enough draws for every step to see new ones; under --time-budget the step count is not
    # known yet, so as many as the files hold (results.json records the number for a rerun).
    draws = c.mixture_draws or (examples if c.time_budget
                                else max(examples, c.max_steps * c.batch_size))
    mixture = MixtureDataset(datasets, rates, seed=c.seed,
                             length=max(draws, c.batch_size * env.world_size))
    if env.is_main and (note := mixture.repeat_note(c.batch_size)):
        print(note)
    return mixture
