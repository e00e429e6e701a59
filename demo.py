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
import sys
import time
from pathlib import Path

import torch

import eval as evaluate_script
import train_pretrain
import train_seg
import train_sft
from minivlm.data.shapes import ShapesConfig, generate
from minivlm.train_tokenizer import main as train_tokenizer

# Sizes of each stage: the full recipe for a 2-core CPU, and a smoke-test one.
RECIPES = {
    "full": dict(vocab=640, pretrain_steps=300, sft_steps=700, seg_steps=300, batch=32,
                 eval_items=400, seg_items=200, model=[
                     "--lm-dim", "128", "--lm-num-layers", "4", "--lm-num-heads", "4",
                     "--lm-num-kv-heads", "2", "--lm-hidden-dim", "384",
                     "--lm-max-seq-len", "512", "--vision-width", "128", "--vision-layers", "3",
                     "--vision-head-width", "32", "--vision-patch-size", "4"]),
    "quick": dict(vocab=360, pretrain_steps=2, sft_steps=2, seg_steps=2, batch=4,
                  eval_items=8, seg_items=3, model=[
                      "--lm-dim", "32", "--lm-num-layers", "1", "--lm-num-heads", "2",
                      "--lm-num-kv-heads", "1", "--lm-hidden-dim", "64",
                      "--lm-max-seq-len", "512", "--vision-width", "32", "--vision-layers", "1",
                      "--vision-head-width", "16", "--vision-patch-size", "8",
                      "--seg-decoder-dim", "16", "--seg-decoder-mlp-dim", "32"]),
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
    common = ["--batch-size", str(recipe["batch"]), "--seed", str(args.seed), "--keep", "1",
              "--log-every", "25"]
    stage("pretrain", train_pretrain.main, [
        "--data", f"{data}/pretrain.json", "--tokenizer", str(runs / "tokenizer"),
        "--out-dir", str(runs / "pretrain"), "--max-steps", str(recipe["pretrain_steps"]),
        *recipe["model"], *common])
    stage("sft", train_sft.main, [
        "--init-from", str(runs / "pretrain"), "--data", f"{data}/sft.json",
        "--out-dir", str(runs / "sft"), "--max-steps", str(recipe["sft_steps"]), *common])
    stage("seg", train_seg.main, [
        "--init-from", str(runs / "sft"),
        "--data", f"{data}/reasonseg/train,{data}/sft.json",
        "--sample-rates", "3,1", "--out-dir", str(runs / "seg"),
        "--max-steps", str(recipe["seg_steps"]), *common])
    vqa = stage("eval", evaluate_script.main, [
        "--vqa-json-path", f"{data}/eval.json", "--model-path", str(runs / "seg"),
        "--output-path", str(out / "eval_vqa.json"), "--limit", str(recipe["eval_items"]),
        "--seg-dir", f"{data}/reasonseg/test", "--seg-output-path", str(out / "eval_seg.json"),
        "--save-examples", "8", "--examples-dir", str(out / "examples")])
    results = dict(device=device, seconds=times, metrics=vqa,
                   chance=json.loads((data / "meta.json").read_text())["question_types"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, out)
    return results


def print_table(results: dict, out: Path) -> None:
    m = results["metrics"]
    lines = ["", f"minivlm demo results ({results['device']})", "-" * 48]
    lines.append(f"{'closed accuracy (held-out)':32s}{m.get('CLOSED Questions Acc', 0):8.3f}"
                 f"   chance {m.get('closed_chance', float('nan')):.3f}")
    lines.append(f"{'open BERTScore F1':32s}{m.get('OPEN   Questions BERTScore-F1', 0):8.3f}")
    lines.append(f"{'reasoning-seg gIoU':32s}{m.get('giou', 0):8.3f}")
    lines.append(f"{'reasoning-seg cIoU':32s}{m.get('ciou', 0):8.3f}")
    for name, value in m.get("per_question_type", {}).items():
        lines.append(f"  {name:30s}{value['acc']:8.3f}   chance {value.get('chance', 0):.3f}")
    lines.append("-" * 48)
    for name, seconds in results["seconds"].items():
        lines.append(f"{name + ' (s)':32s}{seconds:8.0f}")
    lines.append(f"{'total (s)':32s}{sum(results['seconds'].values()):8.0f}")
    text = "\n".join(lines)
    print(text)
    (out / "results.txt").write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
