"""An ablation sweep's bookkeeping: the grid of variants, their names, and the summary table.

ablate.py runs the commands; this file only decides what they are and what they measured.

A sweep varies flags, each over a list of values (`--vary lr=1e-3,3e-3`); the variants are every
combination of the values (a grid), and the first value of each flag makes the baseline. A
variant is named by the flags where it differs from the baseline, `lr=3e-3,lm-num-layers=4`
(the baseline is `baseline`), with any character outside `A-Z a-z 0-9 . _ = , + -` replaced by
`_` so the name is a directory name on every system.

The summary has one row per variant. Each numeric value in the runs' results.json files (nested
dicts flattened to dotted keys: `val.closed_accuracy`, `seconds.wall`) becomes mean ± std over
the seeds that finished. std is the sample standard deviation (n - 1 in the denominator, as
`statistics.stdev`): with one seed it is undefined, null in results.json and left out in
results.md. `delta` is the variant's mean minus the baseline's mean (null for the baseline).
"""
from __future__ import annotations

import fnmatch
import itertools
import math
import re
import statistics
from dataclasses import dataclass

BASELINE = "baseline"


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[tuple[str, str], ...]  # (flag without "--", value), in --vary order


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """`lr=1e-3,3e-3` -> ("lr", ["1e-3", "3e-3"]). Values are split on commas, or on semicolons
    when there is one (for a flag whose value holds commas: `sample-rates=6,3,1;1,1,1`)."""
    flag, sep, values = spec.partition("=")
    flag = flag.lstrip("-")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][\w-]*", flag):
        raise ValueError(f"--vary {spec}: expected FLAG=V1,V2,... (e.g. --vary lr=1e-3,3e-3)")
    parts = values.split(";" if ";" in values else ",")
    if not values or any(not v for v in parts):
        raise ValueError(f"--vary {spec}: give one or more non-empty values after '='")
    if len(set(parts)) < len(parts):
        raise ValueError(f"--vary {spec}: a value is given twice")
    return flag, parts


def safe_name(text: str) -> str:
    # no commas: a run's directory goes into comma-separated --data lists (demo.py's)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def variant_grid(vary: list[tuple[str, list[str]]], one_at_a_time: bool = False
                 ) -> list[Variant]:
    """Every combination of the values, the baseline first; with `one_at_a_time`, the baseline
    and then each other value of each flag alone (an ablation table: one change per row).
    Refuses a flag varied twice or two variants whose names would be the same directory."""
    flags = [flag for flag, _ in vary]
    if len(set(flags)) < len(flags):
        raise ValueError(f"--vary names a flag twice: {' '.join(flags)}")
    baseline = [values[0] for _, values in vary]
    combinations = list(itertools.product(*(values for _, values in vary)))
    if one_at_a_time:
        combinations = [tuple(baseline)] + [
            tuple(value if j == i else base for j, base in enumerate(baseline))
            for i, (_, values) in enumerate(vary) for value in values[1:]]
    variants = []
    for combination in combinations:
        changed = [f"{flag}={value}" for flag, value, base in zip(flags, combination, baseline)
                   if value != base]
        name = "+".join(safe_name(change) for change in changed) or BASELINE
        variants.append(Variant(name, tuple(zip(flags, combination))))
    names = [v.name for v in variants]
    if len(set(names)) < len(names):
        raise ValueError("two variants get the same directory name after unsafe characters "
                         f"became '_': {sorted(n for n in names if names.count(n) > 1)[0]}")
    return variants


def variant_args(variant: Variant, listed: set[str]) -> list[str]:
    """The variant's flags as arguments. A value `true` gives `--FLAG`; `false` gives `--no-FLAG`
    when the command lists it (argparse's BooleanOptionalAction, which cli.py uses for every
    bool config field), else leaves the flag out (a plain store_true flag)."""
    args = []
    for flag, value in variant.flags:
        if value == "true":
            args.append(f"--{flag}")
        elif value == "false":
            args += [f"--no-{flag}"] if f"no-{flag}" in listed else []
        else:
            args += [f"--{flag}", value]
    return args


# ---------------------------------------------------------------------------- the summary
def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict under dotted keys (booleans and strings dropped)."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            flat[name] = float(value)
    return flat


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def summarize(variants: list[Variant], seeds: list[int], runs: dict) -> list[dict]:
    """One row per variant. `runs[(variant name, seed)]`: {"results": dict or None, "error":
    str or None, "seconds": float or None} (missing: the run has not happened)."""
    rows = []
    for variant in variants:
        finished = [(s, runs[(variant.name, s)]) for s in seeds
                    if runs.get((variant.name, s), {}).get("results") is not None]
        flats = [flatten(run["results"]) for _, run in finished]
        names = list(dict.fromkeys(name for flat in flats for name in flat))
        walls = [run["seconds"] for _, run in finished if run.get("seconds") is not None]
        rows.append({
            "variant": variant.name, "flags": dict(variant.flags),
            "seeds": [s for s, _ in finished],
            "failed": {str(s): runs[(variant.name, s)]["error"] for s in seeds
                       if runs.get((variant.name, s), {}).get("error") is not None},
            "metrics": {name: mean_std([f[name] for f in flats if name in f]) for name in names},
            "wall_seconds": mean_std(walls) if walls else None})
    base = dict(rows[0]["metrics"], wall_seconds=rows[0]["wall_seconds"])
    for row in rows:
        for name, stat in dict(row["metrics"], wall_seconds=row["wall_seconds"]).items():
            if stat is not None:
                stat["delta"] = (stat["mean"] - base[name]["mean"]
                                 if row is not rows[0] and base.get(name) else None)
    return rows


def _number(x: float, sign: str = "") -> str:
    """4 significant digits; whole numbers from 10,000 up (a token count, not 1.235e+05)."""
    return f"{x:{sign}.0f}" if abs(x) >= 1e4 else f"{x:{sign}.4g}"


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "—"
    text = _number(stat["mean"]) + (f" ± {_number(stat['std'])}" if stat["std"] is not None
                                    else "")
    return text + (f" ({_number(stat['delta'], '+')})" if stat.get("delta") is not None else "")


def markdown_table(rows: list[dict], title: str, seeds: list[int],
                   columns: list[str] | None = None) -> str:
    """results.md: the rows as a Markdown table (4 significant digits), failures listed below.
    `columns`: shell-style patterns (`vqa.closed_accuracy`, `seconds.*`) picking the metrics
    shown, in that order; all of them when None (results.json always keeps all)."""
    metrics = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    if columns:
        metrics = list(dict.fromkeys(name for pattern in columns for name in metrics
                                     if fnmatch.fnmatchcase(name, pattern)))
    lines = [f"# {title}", "",
             f"Seeds {','.join(map(str, seeds))}: mean ± sample std over the seeds that "
             "finished (± left out with one); (+x) = the mean's change against baseline; "
             "wall (s) = each run's whole process.", "",
             "| variant | runs | " + " | ".join(metrics) + " | wall (s) |",
             "|---" * (len(metrics) + 3) + "|"]
    for row in rows:
        cells = [_cell(row["metrics"].get(name)) for name in metrics]
        lines.append(f"| {row['variant']} | {len(row['seeds'])}/{len(seeds)} | "
                     + " | ".join(cells) + f" | {_cell(row['wall_seconds'])} |")
    failed = [(row["variant"], seed, error) for row in rows
              for seed, error in row["failed"].items()]
    if failed:
        lines += ["", "Failed runs (their log: VARIANT/seedS/log.txt):", ""]
        lines += [f"- {variant}/seed{seed}: {error}" for variant, seed, error in failed]
    return "\n".join(lines) + "\n"
