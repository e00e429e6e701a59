"""Kill -9 a training run at random moments while it saves; after every kill, `latest` must name
a complete checkpoint that loads, and --resume must continue from it.

    python scripts/kill_during_saves.py --kills 100             # ~1 min on a 2-core CPU
    python scripts/kill_during_saves.py --kills 8 --data D/pretrain.json --tokenizer T   # tests

Every round is tiny pretraining (train_pretrain.main) into the same run directory (--keep 0), in
a child process forked from this one, so it starts in a fraction of a second (torch and open_clip
are imported once, here). Rounds repeat in fours:
  rerun        --overwrite, a save every step: each replaces an older step directory of its name
  resume       --resume from whatever `latest` names, a hidden `.tmp_`/`.old_` copy included
  aimed rerun  --overwrite with its first save at the step `latest` names (the issue's case: the
               same command run again), killed inside that save: at a random moment of it, or
               every other time within a millisecond of its last file being written, when it is
               renamed into place (the window `install` in minivlm/train/checkpoint.py closes;
               kills spread over whole saves land there only a few times in a hundred)
  resume
Other rounds are killed a uniform random delay (0 to --window s) after their first save moved
`latest`. Checked after each kill (SIGKILL): every file of the checkpoint `latest` names is there,
and its weights, tokenizer, optimizer, RNG and trainer state load. Finally one --resume run
finishes without a kill and must leave `latest` on its last step and no hidden directory behind.
With install's steps in the old order (remove the old directory, then rename the new one in) this
fails within the first few aimed kills. POSIX only (fork, SIGKILL).
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

# One thread: the forked children then inherit no thread pool half-copied (fork copies only the
# calling thread), and several of them never compete for the cores.
os.environ["OMP_NUM_THREADS"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402, F401  imported once here, not in every child
import torch.utils.tensorboard  # noqa: E402, F401  (the trainer imports it when it starts)

import train_pretrain  # noqa: E402
from minivlm.data.shapes.config import ShapesConfig  # noqa: E402
from minivlm.data.shapes.generate import generate  # noqa: E402
from minivlm.train.checkpoint import (load_optimizer_state, load_tensor_file,  # noqa: E402
                                      read_trainer_state)
from minivlm.train.distributed import init_distributed  # noqa: E402
from minivlm.train_tokenizer import main as train_tokenizer  # noqa: E402
from minivlm.load import load_vlm  # noqa: E402
from minivlm.weights.checkpoint import LATEST, resolve_checkpoint  # noqa: E402

FILES = ["config.json", "model.safetensors", "trainer_state.json", "optimizer_rank0.pt",
         "rng_rank0.pt", "tokenizer/tokenizer_config.json"]


def check(run: Path) -> tuple[str, int]:
    """(the directory `latest` names, its step) once everything a resume reads has loaded."""
    ckpt = resolve_checkpoint(run)
    missing = [name for name in FILES if not (ckpt / name).is_file()]
    if missing:
        raise RuntimeError(f"{ckpt}: {', '.join(missing)} missing")
    load_vlm(run)  # weights, config, tokenizer (and that the tokenizer fits the model)
    state = read_trainer_state(ckpt)
    if not ckpt.name.endswith(f"step_{state['step']:06d}"):
        raise RuntimeError(f"{ckpt}: trainer_state.json says step {state['step']}")
    load_optimizer_state(ckpt, init_distributed(False), zero1=False)
    load_tensor_file(ckpt / "rng_rank0.pt")
    return ckpt.name, state["step"]


def fork(fn, *args, log: Path | None = None) -> tuple[int, int]:
    """Start fn(*args) in a child process: (its pid, the read end of a pipe that will hold
    pickle.dumps((error message or None, result)))."""
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    os.close(read)
    if log is not None:
        with open(log, "ab") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
    try:
        outcome = (None, fn(*args))
    except BaseException as error:
        outcome = (f"{type(error).__name__}: {error}", None)
    with os.fdopen(write, "wb") as pipe:
        pickle.dump(outcome, pipe)
    os._exit(0)  # never run the parent's code after this in the child


def join(pid: int, read: int):
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        return None  # killed before it could report
    error, result = pickle.loads(data)
    if error:
        raise RuntimeError(error)
    return result


def pointer_id(run: Path) -> int | None:
    """Changes whenever `latest` is rewritten (os.replace gives it a new inode)."""
    try:
        return (run / LATEST).stat().st_ino
    except FileNotFoundError:
        return None


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        pass  # no sleep: a sleep's granularity is as long as the moment we are waiting for


def busy_wait(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:  # time.sleep cannot wait a fraction of a millisecond
        pass


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--window", type=float, default=0.3,
                        help="seconds after the round's first save in which the kill lands")
    parser.add_argument("--out", type=Path, help="default: a new temporary directory")
    parser.add_argument("--data", help="a pretrain JSON (default: a quick synthetic world)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: trained here)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kill_during_saves_"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.data or not args.tokenizer:
        generate(out / "shapes", args.seed, ShapesConfig.quick())
        args.data = str(out / "shapes" / "pretrain.json")
        texts = f"{args.data},{out / 'shapes' / 'sft.json'}"
        join(*fork(train_tokenizer, ["--data", texts, "--vocab-size", "360",
                                     "--out", str(out / "tokenizer")], log=out / "train.log"))
        args.tokenizer = str(out / "tokenizer")
    run, log = out / "run", out / "train.log"
    flags = ["--data", args.data, "--tokenizer", args.tokenizer, "--out-dir", str(run),
             "--model-preset", "demo-quick", "--batch-size", "4", "--keep", "0",
             "--log-every", "1000", "--warmup-steps", "2"]
    rng = random.Random(args.seed)
    started, hidden, aimed, name, step = time.time(), 0, 0, "", 0
    for kill in range(args.kills):
        before = pointer_id(run)
        # Rounds: rerun (--overwrite, a save every step), resume, aimed rerun, resume. An aimed
        # rerun's first save is of the step `latest` names (the case: the same command
        # run again), and the kill lands in that save.
        aim = kill % 4 == 2 and step > 0 and not name.startswith(".")
        mode = ["--resume", "--save-every", "1"] if kill % 2 else \
            ["--overwrite", "--save-every", str(step if aim else 1)]
        pid, read = fork(train_pretrain.main, [*flags, "--max-steps", "100000", *mode], log=log)
        if aim:
            # At a random moment of the save, or (every other time) of the millisecond in which
            # it is renamed into place, which moments spread over a whole save rarely hit.
            tmp = run / f".tmp_{name}"
            precise = kill % 8 == 2
            wait_for(tmp / "trainer_state.json" if precise else tmp)
            busy_wait(rng.uniform(0, 0.001 if precise else 0.015))
            aimed += 1
        else:
            deadline = time.time() + 120
            while pointer_id(run) == before:  # not saving yet: start-up, data, the first step
                if os.waitpid(pid, os.WNOHANG)[0] or time.time() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    sys.exit(f"round {kill}: the run stopped before its first save; see {log}")
                time.sleep(0.001)
            time.sleep(rng.uniform(0, args.window))
        os.kill(pid, signal.SIGKILL)
        join(pid, read)
        try:
            name, step = join(*fork(check, run))
        except RuntimeError as error:
            sys.exit(f"FAILED after kill {kill + 1} ({mode[0]}): {error}")
        hidden += name.startswith(".")
        print(f"kill {kill + 1}/{args.kills} ({mode[0]}): latest -> {name}", flush=True)
    # One run to the end: it must finish what the last kill interrupted and clean up after it.
    try:
        join(*fork(train_pretrain.main, [*flags, "--max-steps", str(step + 2), "--resume"],
                   log=log))
        name, last = join(*fork(check, run))
    except RuntimeError as error:
        sys.exit(f"the final --resume run failed: {error}")
    leftovers = sorted(p.name for p in run.glob(".*step_*"))
    if last != step + 2 or name.startswith(".") or leftovers:
        sys.exit(f"after the final run: latest -> {name}, hidden directories {leftovers}")
    summary = dict(kills=args.kills, seconds=round(time.time() - started, 1),
                   aimed_at_the_latest_step=aimed, latest_hidden_after_kill=hidden,
                   final_step=last)
    print(f"{args.kills} kills in {summary['seconds']} s ({aimed} aimed at the save replacing the "
          f"step `latest` named): every checkpoint loaded, `latest` named a hidden copy after "
          f"{hidden} of them; the final --resume reached step {last}")
    return summary


if __name__ == "__main__":
    main()
