r"""Run an ablation: one training command over a grid of flag values and seeds, then a table.

    python ablate.py --out runs/abl --seeds 0,1 --vary lr=1e-3,3e-3 --vary lm-num-layers=2,4 \
        -- python train_sft.py --init-from runs/pretrain --data data/shapes/sft.json
    python ablate.py --out runs/abl_compile --vary compile=false,true --jobs 2 -- \
        python train_pretrain.py --data data/shapes/pretrain.json --tokenizer runs/tokenizer

runs `COMMAND ARGS --out-dir DIR/<variant>/seed<S> --seed S <the variant's flags>` for every
combination of the --vary values (the first value of each is the baseline) and every seed, in
this directory, each run's stdout and stderr going to DIR/<variant>/seed<S>/log.txt. Variant
names, the grid and the statistics are minivlm/sweep.py's (`baseline`, `lr=3e-3`,
`lr=3e-3+lm-num-layers=4`; mean ± sample std over seeds). A value `true` / `false` turns a switch
on / off (`--compile` / `--no-compile`, or no flag when the command has no `--no-` form).
`--one-at-a-time` runs, instead of the grid, the baseline and each other value of each flag alone:
an ablation table with one change per row (README, "What matters at small scale").

Every training script writes DIR/<variant>/seed<S>/results.json when it finishes
(minivlm/train/results.py); a run directory that holds one is done, so running the same sweep
again skips it and reruns only what failed or never ran (a run without results.json starts over:
its directory is emptied first). A failed run is recorded with the last line of its log and the
sweep goes on. The table, one row per variant, is written to DIR/results.md and DIR/results.json
after every run. `--seeds` may change between runs of a sweep (add seeds later); the command and
the --vary lists may not: DIR/sweep.json keeps them and a different sweep is refused (--force
deletes the old sweep's runs and tables). TensorBoard logs land in each run's directory, so
`tensorboard --logdir DIR` overlays them all. Exit code 1 when a run failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minivlm.errors import run_cli
from minivlm.files import write_json_atomic, write_text_atomic
from minivlm.sweep import markdown_table, parse_vary, summarize, variant_args, variant_grid
from minivlm.train.results import RESULTS_FILE  # each run's, and the sweep's summary

RUN_FILE = "run.json"  # ablate's record of one run: its command, exit code, seconds, error line
LOG_FILE = "log.txt"
SWEEP_FILE = "sweep.json"
RESERVED = {"out-dir", "seed"}  # ablate sets these itself for every run
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def parse_args(argv: list[str]):
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the sweep's directory")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--vary", action="append", default=[], metavar="FLAG=V1,V2",
                        help="a flag and its values (repeat for a grid); the first is baseline")
    parser.add_argument("--columns", default="", metavar="PATTERNS",
                        help="results.md's metrics, comma-separated shell patterns "
                             "(vqa.closed_accuracy,seconds.*); default all. Not part of the "
                             "sweep: rerun with other columns to redraw the table")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="not a grid: the baseline, then each other value of each flag "
                             "alone (one change per row)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU threads split)")
    parser.add_argument("--force", action="store_true",
                        help="delete a different sweep found in --out and start this one")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    if not args.command:
        raise ValueError("give the command to run after '--': "
                         "ablate.py --out DIR [--vary FLAG=V1,V2] -- python train_sft.py ...")
    if not re.fullmatch(r"\d+(,\d+)*", args.seeds):
        raise ValueError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(args.seeds)) < len(args.seeds):
        raise ValueError(f"--seeds names a seed twice: {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    args.vary = [parse_vary(spec) for spec in args.vary]
    for flag, _ in args.vary:
        if flag in RESERVED:
            raise ValueError(f"--vary {flag}: ablate.py sets --{flag} itself (use --seeds)"
                             if flag == "seed" else f"--vary {flag}: ablate.py sets --{flag}")
    return args


def listed_flags(command: list[str]) -> set[str]:
    """The flags `COMMAND --help` names (without "--"); refuses a command whose help fails or
    that takes no --out-dir / --seed."""
    done = subprocess.run(command + ["--help"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"{' '.join(command)} --help failed (exit code {done.returncode}): "
                         f"{last_line(done.stdout + done.stderr)}")
    # Only argparse's option list: the description above it may mention flags of other scripts.
    options = re.split(r"^(?:options|optional arguments):$", done.stdout, maxsplit=1,
                       flags=re.M)[-1]
    listed = set(re.findall(r"(?<![\w-])--([A-Za-z0-9][\w-]*)", options))
    missing = sorted(RESERVED - listed)
    if missing:
        raise ValueError(f"{' '.join(command)} does not accept --{missing[0]} (not in its --help)")
    return listed


def check_sweep_dir(out: Path, definition: dict, force: bool) -> None:
    """Refuse a directory that holds another sweep (or anything else); --force deletes the other
    sweep's own files, nothing more."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / SWEEP_FILE).is_file():
        raise ValueError(f"{out} is not empty and holds no {SWEEP_FILE}: not a sweep "
                         "directory; choose a new or empty --out")
    old = read_json(out / SWEEP_FILE)
    old = dict(old, one_at_a_time=old.get("one_at_a_time", False))  # absent: an older sweep
    if {k: old.get(k) for k in definition} == definition:
        return
    if not force:
        changed = " and ".join({"command": "the command", "vary": "the --vary lists",
                                "one_at_a_time": "--one-at-a-time"}[k]
                               for k in definition if old.get(k) != definition[k])
        raise ValueError(f"{out} holds a different sweep ({changed} differ from "
                         f"{out / SWEEP_FILE}); choose another --out, or --force to delete it")
    for variant in variant_grid([(flag, values) for flag, values in old.get("vary", [])],
                                bool(old.get("one_at_a_time"))):
        shutil.rmtree(out / variant.name, ignore_errors=True)
    for name in (SWEEP_FILE, RESULTS_FILE, "results.md"):
        (out / name).unlink(missing_ok=True)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def last_line(text: str) -> str:
    """The last non-empty line of a log (a traceback's last line is its error), shortened."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_one(command: list[str], run_dir: Path, threads: int) -> dict:
    """Run one command with its output in run_dir/log.txt; returns its run.json record."""
    if run_dir.exists():  # an unfinished earlier attempt: start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{v: str(threads) for v in THREAD_VARS})
    started = time.time()
    with open(run_dir / LOG_FILE, "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.time() - started
    error = None  # a run is done when it wrote results.json (its exit code aside)
    if not (run_dir / RESULTS_FILE).is_file():
        tail = last_line((run_dir / LOG_FILE).read_text(encoding="utf-8", errors="replace"))
        error = (f"exited 0 without writing {RESULTS_FILE}" if code == 0
                 else f"killed by signal {-code}" if code < 0 else tail or f"exit code {code}")
    record = {"command": command, "exit_code": code, "seconds": seconds, "error": error}
    write_json_atomic(run_dir / RUN_FILE, record)
    return record


def read_run(run_dir: Path) -> dict:
    """What the summary needs of one run: its results.json (if it finished), error, seconds."""
    record = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
    results = read_json(run_dir / RESULTS_FILE) if (run_dir / RESULTS_FILE).is_file() else None
    return {"results": results, "seconds": record.get("seconds"),
            "error": None if results is not None else record.get("error")}


def write_summary(out: Path, args, variants, running=frozenset()) -> dict:
    """DIR/results.json and results.md from the run files; a run still `running` counts as not
    run yet (its results.json may be half-written)."""
    runs = {(v.name, s): read_run(out / v.name / f"seed{s}") for v in variants for s in args.seeds
            if out / v.name / f"seed{s}" not in running}
    rows = summarize(variants, args.seeds, runs)
    summary = {"command": args.command, "seeds": args.seeds,
               "vary": {flag: values for flag, values in args.vary},
               "std": "sample standard deviation over seeds (n - 1); null with one seed",
               "failed_runs": sum(len(row["failed"]) for row in rows), "variants": rows}
    write_json_atomic(out / RESULTS_FILE, summary)
    write_text_atomic(out / "results.md", markdown_table(
        rows, "Ablation: " + " ".join(args.command), args.seeds,
        [c for c in args.columns.split(",") if c] or None))
    return summary


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    variants = variant_grid(args.vary, args.one_at_a_time)
    definition = {"command": args.command, "vary": [[f, v] for f, v in args.vary],
                  "one_at_a_time": args.one_at_a_time}
    check_sweep_dir(out, definition, args.force)
    listed = listed_flags(args.command)
    for flag, values in args.vary:
        if flag not in listed:
            raise ValueError(f"--vary {flag}: {' '.join(args.command)} has no --{flag} "
                             "(not in its --help)")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SWEEP_FILE, dict(definition, seeds=args.seeds))

    todo, total = [], len(variants) * len(args.seeds)
    for i, variant in enumerate(variants):
        for seed in args.seeds:
            run_dir = out / variant.name / f"seed{seed}"
            if not (run_dir / RESULTS_FILE).is_file():
                command = args.command + ["--out-dir", str(run_dir), "--seed", str(seed)] \
                    + variant_args(variant, listed)
                todo.append((i, variant, seed, run_dir, command))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cpus or 1) // args.jobs)
    print(f"[ablate] {len(variants)} variants x {len(args.seeds)} seeds = {total} runs; "
          f"{total - len(todo)} already finished, {len(todo)} to run, {args.jobs} at a time "
          f"({threads} CPU thread(s) each)", flush=True)
    started = time.time()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        running, seconds = {run_dir for _, _, _, run_dir, _ in todo}, []
        futures = {pool.submit(run_one, command, run_dir, threads): (i, variant, seed, run_dir)
                   for i, variant, seed, run_dir, command in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i, variant, seed, run_dir = futures[future]
            record = future.result()
            running.discard(run_dir)
            elapsed = time.time() - started
            seconds.append(record["seconds"])
            # the runs still to finish, at this session's mean run time, --jobs at a time
            eta = statistics.fmean(seconds) * (len(todo) - done) / args.jobs
            status = (f"ok in {record['seconds']:.1f}s" if record["error"] is None
                      else f"FAILED ({record['error']}; log: {run_dir / LOG_FILE})")
            print(f"[ablate] run {done}/{len(todo)}: variant {i + 1} of {len(variants)} "
                  f"{variant.name} seed {seed}: {status} | elapsed {_clock(elapsed)} "
                  f"ETA {_clock(eta)}", flush=True)
            write_summary(out, args, variants, running)
    finally:  # on Ctrl-C, start no queued run (the running ones got the SIGINT too)
        pool.shutdown(cancel_futures=True)
    summary = write_summary(out, args, variants)
    print(f"[ablate] table: {out / 'results.md'}; "
          f"{summary['failed_runs']} of {total} runs failed", flush=True)
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    return summary


if __name__ == "__main__":
    raise SystemExit(1 if run_cli(main)["failed_runs"] else 0)
