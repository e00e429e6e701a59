"""The main job: the whole minivlm pipeline on the built-in synthetic world, in one command.

    generate data -> train tokenizer -> pretrain -> SFT -> segmentation -> eval (VQA + seg)

then a results table (closed accuracy beside chance, open BERTScore F1, gIoU, cIoU, wall time per
stage, device) and example predictions with mask overlays, all under --out (default runs/demo).
Picks CUDA when present; otherwise the sizes are tuned for a 2-core CPU (about 10 minutes).

    python demo.py                 # the full run
    python demo.py --quick         # a seconds-long smoke run of every stage (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import eval as evaluate_script
import train_pretrain
import train_seg
import train_sft
from minivlm.data.shapes import ShapesConfig, generate
from minivlm.errors import run_cli
from minivlm.train_tokenizer import main as train_tokenizer

# Sizes of each stage: the full recipe for a 2-core CPU, and a smoke-test one. The model's sizes
# are presets (minivlm/models/presets.py), so a training script can rebuild them by name.
RECIPES = {
    "full": dict(vocab=640, pretrain_steps=300, sft_steps=1400, seg_steps=300, batch=32,
                 eval_items=400, seg_items=200, model_preset="demo"),
    "quick": dict(vocab=360, pretrain_steps=2, sft_steps=2, seg_steps=2, batch=4,
                  eval_items=8, seg_items=3, model_preset="demo-quick"),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipe = RECIPES["quick" if args.quick else "full"]
    out = Path(args.out)
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

    shapes = ShapesConfig.quick() if args.quick else ShapesConfig()
    stage("data", generate, data, args.seed, shapes)
    stage("tokenizer", train_tokenizer, [
        "--data", f"{data}/pretrain.json,{data}/sft.json", "--vocab-size", str(recipe["vocab"]),
        "--out", str(runs / "tokenizer")])
    # A rerun into the same --out starts every stage over (the stages refuse this without it).
    common = ["--batch-size", str(recipe["batch"]), "--seed", str(args.seed), "--keep", "1",
              "--log-every", "50", "--overwrite"]
    stage("pretrain", train_pretrain.main, [
        "--data", f"{data}/pretrain.json", "--tokenizer", str(runs / "tokenizer"),
        "--out-dir", str(runs / "pretrain"), "--max-steps", str(recipe["pretrain_steps"]),
        "--model-preset", recipe["model_preset"], *common])
    stage("sft", train_sft.main, [
        "--init-from", str(runs / "pretrain"), "--data", f"{data}/sft.json",
        "--out-dir", str(runs / "sft"), "--max-steps", str(recipe["sft_steps"]), *common])
    # The seg stage adds the segmentation head, sized by the same preset (its --seg-* defaults).
    stage("seg", train_seg.main, [
        "--init-from", str(runs / "sft"),
        "--data", f"{data}/reasonseg/train,{data}/sft.json",
        "--sample-rates", "3,1", "--out-dir", str(runs / "seg"),
        "--max-steps", str(recipe["seg_steps"]), "--model-preset", recipe["model_preset"],
        *common])
    vqa = stage("eval_vqa", evaluate_script.main, [
        "--vqa-json-path", f"{data}/eval.json", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_vqa.json"), "--limit", str(recipe["eval_items"]),
        "--max-new-tokens", "48", "--batch-size", "50"])
    seg = stage("eval_seg", evaluate_script.main, [
        "--seg-dir", f"{data}/reasonseg/test", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_seg.json"), "--limit", str(recipe["seg_items"]),
        "--save-examples", "8", "--examples-dir", str(out / "examples"), "--batch-size", "50"])
    meta = json.loads((data / "meta.json").read_text())
    results = dict(device=device, seconds=times, vqa=vqa, seg=seg,
                   chance=meta["question_types"]["eval"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, out)
    return results


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
    lines.append(f"{'total (s)':34s}{sum(results['seconds'].values()):7.0f}")
    text = "\n".join(lines)
    print(text)
    (out / "results.txt").write_text(text + "\n")


if __name__ == "__main__":
    run_cli(main)
