"""The main job: the whole minivlm pipeline on the built-in synthetic world, in one command.

    generate data -> train tokenizer -> pretrain -> SFT -> segmentation -> eval (VQA + seg)

then a results table (closed accuracy beside chance, open BERTScore F1, gIoU, cIoU, wall time per
stage, device) and example predictions with mask overlays, all under --out-dir (default
runs/demo). Picks CUDA when present; otherwise the sizes are tuned for a 2-core CPU (about 10
minutes).

    python demo.py                          # the full run
    python demo.py --quick                  # a seconds-long smoke run of every stage (the tests)
    python demo.py --seed 1 --mask-loss-from seg --image-attention causal   # another recipe

Every choice of the recipe is a flag (the Recipe fields below), passed to the stages that use it,
so a sweep over recipes is one command (see "What matters at small scale" in the README):

    python ablate.py --out runs/abl --seeds 0,1 --vary seg-head=sam,dot -- python demo.py
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import eval as evaluate_script
import train_pretrain
import train_seg
import train_sft
from minivlm.cli import add_config_args, config_from_args, set_config_defaults
from minivlm.data.shapes import ShapesConfig, generate
from minivlm.errors import run_cli
from minivlm.files import write_json_atomic
from minivlm.ranges import above, at_least, check_ranges, one_of
from minivlm.train.results import RESULTS_FILE
from minivlm.train.stage import parse_args as parse_stage_args
from minivlm.train_tokenizer import main as train_tokenizer


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
    pretrain_steps: int = field(default=500, metadata=at_least(1))
    sft_steps: int = field(default=1000, metadata=at_least(1))
    seg_steps: int = field(default=40, metadata=at_least(1))
    # every stage: batches of similar lengths (less padding: more real tokens a second)
    group_by_length: bool = False
    pretrain_lr: float = field(default=1e-3, metadata=above(0))
    sft_lr: float = field(default=1e-3, metadata=above(0))
    seg_lr: float = field(default=1e-3, metadata=above(0))
    # "sft": the seg head joins in the SFT stage and masks train with the questions from there
    # on (--sft-rates mixes them); "seg": only the last stage learns masks (LISA's order)
    mask_loss_from: str = field(default="sft", metadata=one_of("sft", "seg"))
    sft_rates: str = "2,3,1"  # ReasonSeg : questions : captions in SFT (with masks from SFT)
    seg_rates: str = "3,1"  # ReasonSeg : questions in the seg stage
    seg_lora_r: int = field(default=8, metadata=at_least(0))  # 0 = the seg stage trains fully
    # model options (minivlm/models/): how the LM sees image tokens, which head makes masks
    image_attention: str = field(default="bidirectional",  # within one image
                                 metadata=one_of("causal", "bidirectional"))
    # "2d": learned row and column embeddings for the image tokens
    image_positions: str = field(default="2d", metadata=one_of("none", "2d"))
    # LISA's SAM-style decoder, or a dot-product baseline
    seg_head: str = field(default="sam", metadata=one_of("sam", "dot"))
    seg_prompt: str = field(default="predicting", metadata=one_of("predicting", "seg_token"))
    # SAM's dense prompt: none (LISA) or SimilarityPrompt; the dot head has none
    seg_dense_prompt: str = field(default="similarity", metadata=one_of("none", "similarity"))
    eval_items: int = field(default=400, metadata=at_least(1))  # held-out questions
    seg_items: int = field(default=200, metadata=at_least(1))  # held-out referring masks

    def __post_init__(self):
        check_ranges(self)


# demo.py --quick: every stage in seconds, on the tiny "demo-quick" model.
QUICK = dict(train_images=16, seg_scenes=6, vocab=360, model_preset="demo-quick", batch_size=4,
             pretrain_steps=2, sft_steps=2, seg_steps=2, eval_items=8, seg_items=3)


def parse_args(argv=None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", "--out", dest="out_dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    add_config_args(parser, Recipe)
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes become the defaults; a flag given explicitly still wins
        set_config_defaults(parser, "", QUICK)
        args = parser.parse_args(argv)
    return args, config_from_args(args, Recipe)


def stage_commands(r: Recipe, data: Path, runs: Path, seed: int) -> dict[str, list[str]]:
    """Each training stage's command line. Model options go to the stage that builds the part
    they shape: image options to pretrain (the fresh model), seg options where the head joins."""
    # A rerun into the same --out-dir starts every stage over (the stages refuse this without it).
    common = ["--batch-size", str(r.batch_size), "--seed", str(seed), "--keep", "1",
              "--log-every", "50", "--overwrite",
              *(["--group-by-length"] if r.group_by_length else [])]
    seg_options = ["--seg-head", r.seg_head, "--seg-prompt", r.seg_prompt,
                   "--model-preset", r.model_preset]
    if r.seg_head == "sam":
        seg_options += ["--seg-dense-prompt", r.seg_dense_prompt]
    joint = r.mask_loss_from == "sft"
    sft_data = [f"{data}/reasonseg/train", f"{data}/sft.json", f"{data}/pretrain.json"]
    return {
        "pretrain": [
            "--data", f"{data}/pretrain.json", "--tokenizer", str(runs / "tokenizer"),
            "--out-dir", str(runs / "pretrain"), "--max-steps", str(r.pretrain_steps),
            "--lr", str(r.pretrain_lr), "--model-preset", r.model_preset,
            "--image-attention", r.image_attention, "--image-positions", r.image_positions,
            *common],
        "sft": [
            "--init-from", str(runs / "pretrain"), "--out-dir", str(runs / "sft"),
            "--max-steps", str(r.sft_steps), "--lr", str(r.sft_lr), *common,
            *(["--data", ",".join(sft_data), "--sample-rates", r.sft_rates, "--seg-enabled",
               *seg_options] if joint else ["--data", f"{data}/sft.json"])],
        # The seg stage adds the segmentation head (unless SFT did), sized by the preset.
        "seg": [
            "--init-from", str(runs / "sft"),
            "--data", f"{data}/reasonseg/train,{data}/sft.json",
            "--sample-rates", r.seg_rates, "--out-dir", str(runs / "seg"),
            "--max-steps", str(r.seg_steps), "--lr", str(r.seg_lr),
            "--lora-r", str(r.seg_lora_r), *seg_options, *common],
    }


def main(argv=None) -> dict:
    args, recipe = parse_args(argv)
    out = Path(args.out_dir)
    data, runs = out / "data", out / "runs"
    device = "cuda" if torch.cuda.is_available() else "cpu"
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
    shapes = replace(base, num_train_images=recipe.train_images, num_seg_train=recipe.seg_scenes)
    stage("data", generate, data, args.seed, shapes)
    stage("tokenizer", train_tokenizer, [
        "--data", f"{data}/pretrain.json,{data}/sft.json", "--vocab-size", str(recipe.vocab),
        "--out", str(runs / "tokenizer")])
    for name, script in stages.items():
        stage(name, script.main, commands[name])
    vqa = stage("eval_vqa", evaluate_script.main, [
        "--vqa-json-path", f"{data}/eval.json", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_vqa.json"), "--limit", str(recipe.eval_items),
        "--max-new-tokens", "48", "--batch-size", "50"])
    seg = stage("eval_seg", evaluate_script.main, [
        "--seg-dir", f"{data}/reasonseg/test", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_seg.json"), "--limit", str(recipe.seg_items),
        "--save-examples", "8", "--examples-dir", str(out / "examples"), "--batch-size", "50"])
    meta = json.loads((data / "meta.json").read_text())
    results = dict(device=device, seconds=times, vqa=vqa, seg=seg,
                   chance=meta["question_types"]["eval"], total_seconds=sum(times.values()),
                   train={name: stage_results(runs / name) for name in stages})
    write_json_atomic(out / "recipe.json", dict(asdict(recipe), seed=args.seed))
    write_json_atomic(out / "results.json", results)
    print_table(results, out)
    return results


def stage_results(run_dir: Path) -> dict:
    """A stage's own results.json (train/results.py), cut to what the demo's table compares."""
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    return dict(results.get("train", {}), tokens_per_s=results["tokens_per_s"],
                seconds=results["seconds"]["steps"])


def closed_chance(chance: dict) -> float:
    """Expected accuracy of uniform guessing over the closed eval items."""
    closed = [c for c in chance.values() if c["answer_type"] == "CLOSED"]
    return sum(c["chance"] * c["count"] for c in closed) / max(1, sum(c["count"] for c in closed))


def print_table(results: dict, out: Path) -> None:
    vqa, seg, chance = results["vqa"], results["seg"], results["chance"]
    number = lambda v: float("nan") if v is None else v  # noqa: E731
    lines = ["", f"minivlm demo results (device: {results['device']})", "-" * 60,
             f"{'held-out closed accuracy':34s}{number(vqa['closed_accuracy']):7.3f}"
             f"   chance {closed_chance(chance):.3f}",
             f"{'held-out open BERTScore F1':34s}{number(vqa['open_bertscore_f1']):7.3f}",
             f"{'reasoning-seg gIoU':34s}{number(seg['giou']):7.3f}",
             f"{'reasoning-seg cIoU':34s}{number(seg['ciou']):7.3f}",
             f"{'[SEG] emitted unprompted':34s}{number(seg.get('seg_token_rate')):7.3f}",
             "per question type                  acc   chance  majority"]
    for name, value in vqa.get("per_question_type", {}).items():
        c = chance.get(name, {})
        lines.append(f"  {name:32s}{number(value['accuracy']):7.3f}  {number(c.get('chance')):7.3f}"
                     f"  {number(c.get('majority')):7.3f}")
    lines.append("-" * 60)
    for name, seconds in results["seconds"].items():
        lines.append(f"{name + ' (s)':34s}{seconds:7.0f}")
    lines.append(f"{'total (s)':34s}{results['total_seconds']:7.0f}")
    text = "\n".join(lines)
    print(text)
    (out / "results.txt").write_text(text + "\n")


if __name__ == "__main__":
    run_cli(main)
