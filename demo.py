"""The main job: the whole minivlm pipeline on the built-in synthetic world, in one command.

    generate data -> train tokenizer -> pretrain -> SFT -> segmentation -> eval (VQA + seg)

then a results table (closed accuracy beside chance, open BERTScore F1, gIoU, cIoU, per question
type its accuracy ± standard error beside the generator's chance and majority, and what the
model answered against the truth; what it sees, from its own scene descriptions; wall time per
stage, device), the curves of SFT's validations (results.json "curves"; TensorBoard) and example
predictions with mask overlays, all under --out-dir (default runs/demo). Picks CUDA when
present; otherwise the sizes are tuned for a 2-core CPU (under 10 minutes).

    python demo.py                          # the full run
    python demo.py --quick                  # a seconds-long smoke run of every stage (the tests)
    python demo.py --seed 1 --mask-loss-from seg --image-attention causal   # another recipe

Every choice of the recipe is a flag (the Recipe fields below), passed to the stages that use it,
so a sweep over recipes is one command (see "What matters at small scale" in the README):

    python ablate.py --out runs/abl --seeds 0,1 --vary seg-head=sam,dot -- python demo.py
    python ablate.py --out runs/abl_t --seeds 0,1 --vary vision-stem=patch,conv -- \
        python demo.py --pretrain-seconds 60 --sft-seconds 150 --seg-seconds 20  # equal time
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

import eval as evaluate_script
import train_pretrain
import train_seg
import train_sft
from minivlm.cli import (add_config_args, config_flags, config_from_args, config_values,
                         set_config_defaults)
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.generate import generate
from minivlm.devices import resolve_device
from minivlm.errors import run_cli
from minivlm.files import write_json_atomic
from minivlm.models.attention_mask import ImageTokensConfig
from minivlm.models.seg_head import SegConfig
from minivlm.models.vision import VisionConfig
from minivlm.ranges import above, at_least, between, check_ranges, one_of
from minivlm.demo_report import curves, results_table, stage_results
from minivlm.train.stage import parse_args as parse_stage_args
from minivlm.train_tokenizer import main as train_tokenizer

# The model options' choices and flags belong to their configs; the demo only starts from other
# defaults than a plain LLaVA / LISA model: those its ablations chose (README, "What matters at
# small scale"). The dense prompt is one for SAM's decoder: the dot head has none.
IMAGE_DEFAULTS = dict(attention="bidirectional", positions="2d")
SAM_HEAD_DEFAULTS = dict(dense_prompt="similarity")
SEG_OPTIONS = ("head", "prompt", "dense_prompt")  # the rest of SegConfig: the preset's sizes
VISION_OPTIONS = ("stem",)  # the rest of VisionConfig: the preset's sizes


@dataclass
class Recipe:
    """What the demo trains, on what, for how long. The model's sizes are a preset
    (minivlm/models/presets.py), so every training script can rebuild them by name."""

    # data: distinct scenes, so held-out scenes look like the training ones
    train_images: int = field(default=6000, metadata=at_least(1))  # captioned and questioned
    seg_scenes: int = field(default=8000, metadata=at_least(1))  # with referring masks
    vocab: int = field(default=640, metadata=at_least(300))
    model_preset: str = "demo"
    batch_size: int = field(default=16, metadata=at_least(1))
    pretrain_steps: int = field(default=1000, metadata=at_least(1))
    sft_steps: int = field(default=1350, metadata=at_least(1))
    seg_steps: int = field(default=40, metadata=at_least(1))
    # every stage: batches of similar lengths (less padding: more real tokens a second)
    group_by_length: bool = False
    pretrain_lr: float = field(default=1e-3, metadata=above(0))
    sft_lr: float = field(default=1e-3, metadata=above(0))
    seg_lr: float = field(default=1e-3, metadata=above(0))
    vision_lr_scale: float = field(default=1.0, metadata=above(0))  # the tower's LR: x this
    # "sft": the seg head joins in the SFT stage and masks train with the questions from there
    # on (--sft-rates mixes them); "seg": only the last stage learns masks (LISA's order)
    mask_loss_from: str = field(default="sft", metadata=one_of("sft", "seg"))
    sft_rates: str = "2,3,1"  # ReasonSeg : questions : captions in SFT (with masks from SFT)
    seg_rates: str = "3,1"  # ReasonSeg : questions in the seg stage
    seg_lora_r: int = field(default=8, metadata=at_least(0))  # 0 = the seg stage trains fully
    # model options (minivlm/models/), flags from their configs (parse_args): how the LM sees
    # image tokens (--image-attention, --image-positions), and which head makes masks from which
    # hidden state (--seg-head, --seg-prompt, --seg-dense-prompt: SEG_OPTIONS)
    image: ImageTokensConfig = field(default_factory=lambda: ImageTokensConfig(**IMAGE_DEFAULTS))
    seg: SegConfig = field(default_factory=lambda: SegConfig(**SAM_HEAD_DEFAULTS))
    vision: VisionConfig = field(default_factory=VisionConfig)  # --vision-stem patch|conv
    # The world's size is a knob (data/shapes/config.py): the tower is built for the world's images.
    # Up to 3 shapes a scene on the CPU (its model sees kinds and places within the budget:
    # README, "What matters at small scale"); CUDA runs the harder world of 4 (CUDA_DEFAULTS).
    world_image_size: int = field(default=32, metadata=at_least(16))
    world_max_shapes: int = field(default=3, metadata=between(3, 12))  # >= 3: relations stay
    # sizes the preset sets, changed for an ablation (0 = the preset's): the ViT's patch side,
    # and the projector's merge (2: 2x2 patches per image token, 16 tokens; 1: 64 tokens)
    vision_patch_size: int = field(default=0, metadata=at_least(0))
    projector_merge: int = field(default=0, metadata=at_least(0))
    # > 0: the stage trains for about this many seconds instead of its steps (the first steps
    # fix the count: train/time_budget.py); for comparing recipes at equal time (ablate.py).
    # The demo's own default stays a step count: machine load must not change its results.
    pretrain_seconds: float = field(default=0.0, metadata=at_least(0))
    sft_seconds: float = field(default=0.0, metadata=at_least(0))
    seg_seconds: float = field(default=0.0, metadata=at_least(0))
    # answers reason before "### The final answer is:" (data/shapes/reasoning.py): the LM binds
    # colour to kind in text ("The red shapes: the red circle.") before it answers; at full
    # length +0.07 closed accuracy for 8% more SFT time (README, "What matters at small scale")
    reasoning: bool = True
    # validation during SFT on val.json: per-type accuracy and the perception probe, every N
    # steps (TensorBoard, and results.json's "curves")
    val_every: int = field(default=250, metadata=at_least(1))
    val_items: int = field(default=200, metadata=at_least(1))
    # held-out questions: 100 per type (10 types) gives each accuracy a standard error <= 0.05
    eval_items: int = field(default=1000, metadata=at_least(1))
    seg_items: int = field(default=200, metadata=at_least(1))  # held-out referring masks

    def __post_init__(self):
        check_ranges(self)


# The longest answer generated in eval and validation: a four-shape description or a reasoning
# that lists four shapes, then the answer, with room to spare.
ANSWER_TOKENS = 64
# On CUDA the demo has time for the harder world (the README's figures are the CPU's world).
CUDA_DEFAULTS = dict(world_max_shapes=4)
# demo.py --quick: every stage in seconds, on the tiny "demo-quick" model.
QUICK = dict(train_images=16, seg_scenes=6, vocab=360, model_preset="demo-quick", batch_size=4,
             pretrain_steps=2, sft_steps=2, seg_steps=2, eval_items=20, seg_items=3,
             val_every=1, val_items=20)


def parse_args(argv=None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", "--out", dest="out_dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    add_config_args(parser, Recipe)  # all but the model options, which are configs:
    add_config_args(parser, ImageTokensConfig, "image", defaults=IMAGE_DEFAULTS)
    add_config_args(parser, SegConfig, "seg", only=SEG_OPTIONS)
    add_config_args(parser, VisionConfig, "vision", only=VISION_OPTIONS)
    args = parser.parse_args(argv)
    # Defaults that hang on another flag; a flag given explicitly still wins on the second parse.
    if resolve_device().type == "cuda":
        set_config_defaults(parser, "", CUDA_DEFAULTS)
    if args.quick:  # the quick sizes
        set_config_defaults(parser, "", QUICK)
    if args.seg_head == "sam":
        set_config_defaults(parser, "seg", SAM_HEAD_DEFAULTS)
    args = parser.parse_args(argv)
    image = config_from_args(args, ImageTokensConfig, "image")
    seg = config_from_args(args, SegConfig, "seg", only=SEG_OPTIONS)  # refuses a bad pairing
    vision = config_from_args(args, VisionConfig, "vision", only=VISION_OPTIONS)
    return args, config_from_args(args, Recipe, image=image, seg=seg, vision=vision)


def recipe_record(r: Recipe, seed: int) -> dict:
    """recipe.json: every choice under its flag's name (image_attention, seg_head, ...)."""
    record = {f.name: getattr(r, f.name) for f in fields(r)
              if f.name not in ("image", "seg", "vision")}
    return dict(record, **config_values(r.image, "image"),
                **config_values(r.seg, "seg", SEG_OPTIONS),
                **config_values(r.vision, "vision", VISION_OPTIONS), seed=seed)


def steps_or_budget(steps: int, seconds: float) -> list[str]:
    """A stage's length: a step count, or a time budget (--max-steps then only caps it)."""
    if seconds:
        return ["--time-budget", str(seconds), "--max-steps", str(10 ** 6)]
    return ["--max-steps", str(steps)]


def stage_commands(r: Recipe, data: Path, runs: Path, seed: int) -> dict[str, list[str]]:
    """Each training stage's command line. Model options go to the stage that builds the part
    they shape: image options to pretrain (the fresh model), seg options where the head joins."""
    # A rerun into the same --out-dir starts every stage over (the stages refuse this without it).
    common = ["--batch-size", str(r.batch_size), "--seed", str(seed), "--keep", "1",
              "--log-every", "50", "--overwrite", "--vision-lr-scale", str(r.vision_lr_scale),
              *(["--group-by-length"] if r.group_by_length else [])]
    seg_options = [*config_flags(r.seg, "seg", SEG_OPTIONS), "--model-preset", r.model_preset]
    # The long stages decode each of the world's images once up front and hold it (0.01 ms an
    # item instead of 0.12: over 1,000+ steps of 16, more than the ~0.6 s a file it takes); the
    # 40-step seg stage decodes per item. Both give the same batches (tests/test_lazy_data.py).
    preload = ["--preload-images"]
    joint = r.mask_loss_from == "sft"
    sft_data = [f"{data}/reasonseg/train", f"{data}/sft.json", f"{data}/pretrain.json"]
    return {
        "pretrain": [
            "--data", f"{data}/pretrain.json", "--tokenizer", str(runs / "tokenizer"),
            "--out-dir", str(runs / "pretrain"),
            *steps_or_budget(r.pretrain_steps, r.pretrain_seconds),
            "--lr", str(r.pretrain_lr), "--model-preset", r.model_preset,
            *config_flags(r.image, "image"), *config_flags(r.vision, "vision", VISION_OPTIONS),
            "--vision-image-size", str(r.world_image_size),
            *(["--vision-patch-size", str(r.vision_patch_size)] if r.vision_patch_size else []),
            *(["--projector-merge", str(r.projector_merge)] if r.projector_merge else []),
            *preload, *common],
        "sft": [
            "--init-from", str(runs / "pretrain"), "--out-dir", str(runs / "sft"),
            *steps_or_budget(r.sft_steps, r.sft_seconds), "--lr", str(r.sft_lr), *preload,
            *common,
            # per-type accuracy and the perception probe on val.json: the demo's curves
            "--val-data", f"{data}/val.json", "--eval-every", str(r.val_every),
            "--val-limit", str(r.val_items), "--val-max-new-tokens", str(ANSWER_TOKENS),
            *(["--data", ",".join(sft_data), "--sample-rates", r.sft_rates, "--seg-enabled",
               *seg_options] if joint else ["--data", f"{data}/sft.json"])],
        # The seg stage adds the segmentation head (unless SFT did), sized by the preset.
        "seg": [
            "--init-from", str(runs / "sft"),
            "--data", f"{data}/reasonseg/train,{data}/sft.json",
            "--sample-rates", r.seg_rates, "--out-dir", str(runs / "seg"),
            *steps_or_budget(r.seg_steps, r.seg_seconds), "--lr", str(r.seg_lr),
            "--lora-r", str(r.seg_lora_r), *seg_options, *common],
    }


def main(argv=None) -> dict:
    args, recipe = parse_args(argv)
    out = Path(args.out_dir)
    data, runs = out / "data", out / "runs"
    device = str(resolve_device())
    print(f"minivlm demo: device={device}, torch threads={torch.get_num_threads()}, out={out}")
    times: dict[str, float] = {}

    def stage(name, fn, *a):
        print(f"\n=== {name} ===", flush=True)
        start = time.time()
        result = fn(*a)
        times[name] = time.time() - start
        print(f"=== {name}: {times[name]:.0f} s ===", flush=True)
        return result

    commands = stage_commands(recipe, data, runs, args.seed)
    stages = {"pretrain": train_pretrain, "sft": train_sft, "seg": train_seg}
    for name, script in stages.items():  # a bad recipe stops here, before any stage runs
        parse_stage_args(script.__doc__, commands[name])
    base = ShapesConfig.quick() if args.quick else ShapesConfig()
    shapes = replace(base, num_train_images=recipe.train_images, num_seg_train=recipe.seg_scenes,
                     num_val=recipe.val_items, num_test=recipe.eval_items,
                     image_size=recipe.world_image_size, max_shapes=recipe.world_max_shapes,
                     reasoning=recipe.reasoning)
    stage("data", generate, data, args.seed, shapes)
    stage("tokenizer", train_tokenizer, [
        "--data", f"{data}/pretrain.json,{data}/sft.json", "--vocab-size", str(recipe.vocab),
        "--out", str(runs / "tokenizer")])
    for name, script in stages.items():
        stage(name, script.main, commands[name])
    vqa = stage("eval_vqa", evaluate_script.main, [
        "--vqa-json-path", f"{data}/eval.json", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_vqa.json"), "--limit", str(recipe.eval_items),
        "--max-new-tokens", str(ANSWER_TOKENS), "--batch-size", "50"])
    seg = stage("eval_seg", evaluate_script.main, [
        "--seg-dir", f"{data}/reasonseg/test", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_seg.json"), "--limit", str(recipe.seg_items),
        "--save-examples", "8", "--examples-dir", str(out / "examples"), "--batch-size", "50"])
    meta = json.loads((data / "meta.json").read_text())
    results = dict(device=device, seconds=times, vqa=vqa, seg=seg,
                   chance=meta["question_types"]["eval"], total_seconds=sum(times.values()),
                   train={name: stage_results(runs / name) for name in stages},
                   curves=curves([runs / "sft", runs / "seg"]))
    write_json_atomic(out / "recipe.json", recipe_record(recipe, args.seed))
    write_json_atomic(out / "results.json", results)
    print_table(results, out)
    return results


def print_table(results: dict, out: Path) -> None:
    text = results_table(results)
    print(text)
    (out / "results.txt").write_text(text + "\n")


if __name__ == "__main__":
    run_cli(main)
