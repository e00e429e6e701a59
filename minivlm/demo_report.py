"""The demo's report: the curves its stages measured, and the table it prints (results.txt).

Everything here reads files the pipeline already wrote: each stage's results.json (its
validation curve, train/results.py) and the eval summaries (eval/vqa.py), so a finished run can
be re-reported without running anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from minivlm.train.results import RESULTS_FILE


def stage_results(run_dir: Path) -> dict:
    """A stage's own results.json, cut to what the demo's table compares."""
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    return dict(results.get("train", {}), tokens_per_s=results["tokens_per_s"],
                seconds=results["seconds"]["steps"], steps=results["step"],
                **({"budget": results["budget"]} if "budget" in results else {}))


def curves(run_dirs: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """The validations of the stages in `run_dirs`, one after another, as
    {"per_question_type": {T: [{stage, step, seconds, accuracy}]}, "perception": {attribute:
    [...]}, "closed_accuracy": [...]}; step and seconds count on across stages."""
    out: dict = {"per_question_type": {}, "perception": {}, "closed_accuracy": []}
    steps = seconds = 0.0
    for run_dir in run_dirs:
        results = json.loads((run_dir / RESULTS_FILE).read_text())
        for point in results.get("curve", []):
            at = dict(stage=results["stage"], step=int(steps + point["step"]),
                      seconds=seconds + point["seconds"])
            for name, value in point.items():
                group, _, key = name.partition("/")
                if group == "accuracy" and key:
                    out["per_question_type"].setdefault(key, []).append(
                        dict(at, accuracy=value))
                elif group == "perception" and key:
                    out["perception"].setdefault(key, []).append(dict(at, accuracy=value))
                elif name == "closed_accuracy":
                    out["closed_accuracy"].append(dict(at, accuracy=value))
        steps += results["step"]
        seconds += results["seconds"]["steps"]
    return out


def closed_chance(chance: dict) -> float:
    """Expected accuracy of uniform guessing over the closed eval items."""
    closed = [c for c in chance.values() if c["answer_type"] == "CLOSED"]
    return sum(c["chance"] * c["count"] for c in closed) / max(1, sum(c["count"] for c in closed))


def _number(value) -> float:
    return float("nan") if value is None else value


def answers_line(distribution: dict[str, dict[str, int]], most: int = 4) -> str:
    """"truth yes: yes 27 no 13 | truth no: yes 28 no 12": a bias shows as the same row twice."""
    rows = []
    for truth, answers in distribution.items():
        shown = list(answers.items())[:most]
        rest = sum(answers.values()) - sum(n for _, n in shown)
        rows.append(f"{truth}: " + " ".join(f"{a} {n}" for a, n in shown)
                    + (f" other {rest}" if rest else ""))
    return " | ".join(rows)


def results_table(results: dict) -> str:
    vqa, seg, chance = results["vqa"], results["seg"], results["chance"]
    lines = ["", f"minivlm demo results (device: {results['device']})", "-" * 72,
             f"{'held-out closed accuracy':34s}{_number(vqa['closed_accuracy']):7.3f}"
             f"   chance {closed_chance(chance):.3f}",
             f"{'held-out open BERTScore F1':34s}{_number(vqa['open_bertscore_f1']):7.3f}",
             f"{'reasoning-seg gIoU':34s}{_number(seg['giou']):7.3f}",
             f"{'reasoning-seg cIoU':34s}{_number(seg['ciou']):7.3f}",
             f"{'[SEG] emitted unprompted':34s}{_number(seg.get('seg_token_rate')):7.3f}"]
    if vqa.get("perception"):
        lines.append("what it sees (its own descriptions): " + ", ".join(
            f"{k} {v:.2f}" for k, v in vqa["perception"].items()))
    lines.append(f"{'per question type':28s}{'n':>4s}  {'acc ± s.e.':>13s}  chance  majority")
    per_type = vqa.get("per_question_type", {})
    for name, value in per_type.items():
        c = chance.get(name, {})
        lines.append(f"  {name:26s}{value['count']:4d}  {_number(value['accuracy']):6.3f} ± "
                     f"{_number(value.get('standard_error')):5.3f}  {_number(c.get('chance')):6.3f}"
                     f"  {_number(c.get('majority')):6.3f}")
    lines.append("what it answered, by truth (the most frequent answers)")
    for name, value in per_type.items():
        if value.get("answer_distribution"):
            lines.append(f"  {name:14s}{answers_line(value['answer_distribution'])}")
    lines.append("-" * 72)
    for name, seconds in results["seconds"].items():
        lines.append(f"{name + ' (s)':34s}{seconds:7.0f}")
    lines.append(f"{'total (s)':34s}{results['total_seconds']:7.0f}")
    return "\n".join(lines)
