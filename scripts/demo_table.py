"""The README's main-job tables, from demo runs' results.json (one run per seed):

    python scripts/demo_table.py runs/demo_s0 runs/demo_s1 runs/demo_s2

prints markdown: the headline figures and every question type as mean ± sample std over the runs,
beside the generator's chance and majority (from the first run), the perception probe, and each
run's seconds per stage. Nothing is typed into the README by hand.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(run_dirs: list[str]) -> None:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    chance = runs[0]["chance"]
    rows = [("closed-question accuracy", [r["vqa"]["closed_accuracy"] for r in runs]),
            ("open \"describe\" BERTScore F1", [r["vqa"]["open_bertscore_f1"] for r in runs]),
            ("reasoning-seg gIoU (own answers)", [r["seg"]["giou"] for r in runs]),
            ("reasoning-seg cIoU", [r["seg"]["ciou"] for r in runs])]
    print("| measure (held-out test split) | minivlm | chance | majority |\n|---|---|---|---|")
    for name, values in rows:
        print(f"| {name} | **{mean_std(values)}** | | |")
    for name in runs[0]["vqa"]["per_question_type"]:
        if chance.get(name, {}).get("answer_type") != "CLOSED":
            continue
        accuracy = [r["vqa"]["per_question_type"][name]["accuracy"] for r in runs]
        error = statistics.mean(r["vqa"]["per_question_type"][name]["standard_error"]
                                for r in runs)
        print(f"| by type: {name} (n={runs[0]['vqa']['per_question_type'][name]['count']}, "
              f"s.e. {error:.3f}) | {mean_std(accuracy)} | {chance[name]['chance']:.3f} | "
              f"{chance[name]['majority']:.3f} |")
    for name in runs[0]["vqa"].get("perception", {}):
        values = [r["vqa"]["perception"][name] for r in runs]
        print(f"| what it sees: {name} (its descriptions) | {mean_std(values)} | | |")
    stages = list(runs[0]["seconds"])
    print("\n| seconds | " + " | ".join(stages) + " | total |\n" + "|---" * (len(stages) + 2)
          + "|")
    for d, r in zip(run_dirs, runs):
        print(f"| {Path(d).name} | " + " | ".join(f"{r['seconds'][s]:.0f}" for s in stages)
              + f" | **{r['total_seconds']:.0f}** |")


if __name__ == "__main__":
    main(sys.argv[1:])
