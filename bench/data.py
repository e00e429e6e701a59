"""The data path at real size: start-up seconds and peak RSS of train_sft.py, and loader rates.

    python bench/data.py                                  # 1k, 10k, 100k records (minutes)
    python bench/data.py --records 1000,10000 --json runs/bench_data.json
    python bench/data.py --baseline ""                    # the new path only

Records: the synthetic world's SFT records (data/shapes, with reasoning, as the demo), repeated
with new ids into LLaVA JSON files of N records, all pointing at the world's few hundred images.
Each case is `train_sft.py --max-steps 2` on a fresh demo-preset model, run in a subprocess of
its own (so that peaks do not mix), which reports its wall time and its peak RSS (VmHWM: the whole
training process; the tokenising pool's processes are reported apart):
  today      the eager path, as committed at --baseline (default bf0a9bc, the last commit before
             the lazy path): `git archive` of that commit into a temporary folder, run from there.
             It parses the whole file, keeps every record and every token as Python objects, and
             preloads one decoded image per record (its default).
  new cold   this tree, the data index empty: streamed, tokenised in a pool, indexed
  new cached this tree again: the index of the same file is memory-mapped
The goals (issue 21, this 2-core CPU): 100k records against 1k: <= 60 s more the first time,
<= 10 s more cached, <= 2 KB more peak RSS a record.

Loader rates: a lazy ChatDataset of the 10k file through the trainer's DataLoader
(train/loader.py) with 0, 1 and 2 workers, in samples/s, beside what a training step of the demo
model consumes (batch size / seconds per step, measured on the same batches).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from minivlm.data.batch import collate  # noqa: E402
from minivlm.data.images import ImageProcessor  # noqa: E402
from minivlm.data.load_data import DataOptions, load_chat_dataset  # noqa: E402
from minivlm.data.shapes.config import ShapesConfig  # noqa: E402
from minivlm.data.shapes.generate import generate  # noqa: E402
from minivlm.data.load_tokenizer import load_tokenizer  # noqa: E402
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece  # noqa: E402
from minivlm.models.build import build_vlm  # noqa: E402
from minivlm.models.presets import preset_config  # noqa: E402
from minivlm.train.loader import training_loader  # noqa: E402
from minivlm.train_tokenizer import dataset_texts  # noqa: E402

BASELINE = "bf0a9bc"
BATCH = 16
# Runs one case in its own process: train_sft.main, then its own peak RSS and the children's.
CASE = """
import json, os, resource, sys, time
root, argv = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
os.chdir(root)
import train_sft
started = time.time()
train_sft.main(argv)
wall = time.time() - started
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("CASE " + json.dumps({"seconds": wall, "peak_rss_kb": hwm, "children_peak_kb": children}))
"""


def make_world(folder: Path) -> tuple[Path, Path, list[dict]]:
    """(the world's folder, its tokenizer, its SFT records with absolute image paths)."""
    config = ShapesConfig(num_train_images=300, num_train_pairs=60, max_shapes=3,
                          reasoning=True, num_val=0, num_test=0, num_seg_train=0, num_seg_val=0,
                          num_seg_test=0)
    world = folder / "world"
    generate(world, seed=0, config=config)
    tokenizer_dir = folder / "tokenizer"
    train_sentencepiece(dataset_texts([str(world / "pretrain.json"), str(world / "sft.json")]),
                        tokenizer_dir, vocab_size=640)
    records = json.loads((world / "sft.json").read_text())
    for record in records:
        names = record["image"]
        record["image"] = ([str(world / n) for n in names] if isinstance(names, list)
                           else str(world / names))
    return world, tokenizer_dir, records


def write_records(path: Path, records: list[dict], count: int) -> Path:
    with open(path, "w") as f:  # written record by record: the bench itself stays small
        f.write("[")
        for i in range(count):
            f.write(("," if i else "") + json.dumps(dict(records[i % len(records)],
                                                         id=f"bench-{i:07d}")))
        f.write("]")
    return path


def run_case(root: Path, data: Path, tokenizer: Path, out: Path, extra: list[str],
             env: dict) -> dict:
    argv = ["--data", str(data), "--tokenizer", str(tokenizer), "--out-dir", str(out),
            "--model-preset", "demo", "--batch-size", str(BATCH), "--max-steps", "2",
            "--log-every", "1", "--overwrite", *extra]
    result = subprocess.run([sys.executable, "-c", CASE, str(root), json.dumps(argv)],
                            capture_output=True, text=True, env=env)
    line = next((s for s in result.stdout.splitlines() if s.startswith("CASE ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"case failed ({root}): {result.stderr.strip()[-2000:]}")
    return json.loads(line[len("CASE "):])


def baseline_tree(ref: str, folder: Path) -> Path:
    """The committed tree at `ref`, unpacked (git archive: the repository is only read)."""
    tree = folder / f"baseline-{ref}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def startup(counts: list[int], baseline: str, folder: Path, records: list[dict],
            tokenizer: Path) -> list[dict]:
    env = dict(os.environ, MINIVLM_CACHE=str(folder / "cache"))
    tree = baseline_tree(baseline, folder) if baseline else None
    rows = []
    for count in counts:
        data = write_records(folder / f"sft_{count}.json", records, count)
        cases = {"new cold": (REPO, []), "new cached": (REPO, [])}
        if tree is not None:
            cases = {"today": (tree, []), **cases}
        for name, (root, extra) in cases.items():
            measured = run_case(root, data, tokenizer, folder / "run", extra, env)
            rows.append(dict(records=count, case=name, **measured))
            print(f"{count:>7} records  {name:<10}  {measured['seconds']:7.1f} s  "
                  f"peak RSS {measured['peak_rss_kb'] / 1024:7.0f} MB  (largest child "
                  f"{measured['children_peak_kb'] / 1024:.0f} MB)", flush=True)
    return rows


def per_record_costs(rows: list[dict]) -> list[str]:
    """Each case's figures at the largest count against the smallest."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = sorted((r for r in rows if r["case"] == case), key=lambda r: r["records"])
        low, high = mine[0], mine[-1]
        extra = high["records"] - low["records"]
        if extra:
            lines.append(f"{case:<10}  {high['records']} vs {low['records']} records: "
                         f"+{high['seconds'] - low['seconds']:.1f} s, "
                         f"+{(high['peak_rss_kb'] - low['peak_rss_kb']) * 1024 / extra:.0f} B "
                         "peak RSS a record")
    return lines


def loader_rates(data: Path, tokenizer_dir: Path, workers: tuple[int, ...],
                 batches: int) -> dict:
    """Samples/s the loader delivers with each worker count, and what a demo step consumes."""
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = build_vlm(preset_config("demo", seg=False), tokenizer)
    processor = ImageProcessor.for_tower(model.vision)
    dataset, _ = load_chat_dataset(str(data), tokenizer, processor, model.image_tokens_per_tile,
                                   model.config.lm.max_seq_len, DataOptions())
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    plan = [order[i * BATCH:(i + 1) * BATCH] for i in range(batches)]
    rates = {}
    for count in workers:
        loader = training_loader(dataset, plan, lambda b: collate(b, tokenizer.pad_id), count,
                                 torch.device("cpu"), seed=0)
        next(loader)  # workers started and warm
        started = time.time()
        for _ in loader:
            pass
        rates[f"loader, {count} workers"] = BATCH * (batches - 1) / (time.time() - started)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = [collate([dataset[i] for i in indices], tokenizer.pad_id) for indices in plan[:12]]
    for k, batch in enumerate(steps):
        if k == 2:
            started = time.time()  # after two warm-up steps
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rates["demo model's step consumes"] = BATCH * (len(steps) - 2) / (time.time() - started)
    return rates


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="1000,10000,100000")
    parser.add_argument("--baseline", default=BASELINE, help="commit of today's path; '' skips")
    parser.add_argument("--loader-batches", type=int, default=60)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    counts = sorted(int(n) for n in args.records.split(","))
    print(f"load average {os.getloadavg()[0]:.2f} (run with < 2: other programs share the CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        world, tokenizer, records = make_world(folder)
        rows = startup(counts, args.baseline, folder, records, tokenizer)
        for line in per_record_costs(rows):
            print(line)
        data = write_records(folder / "loader.json", records, 10_000)
        rates = loader_rates(data, tokenizer, (0, 1, 2), args.loader_batches)
    for name, rate in rates.items():
        print(f"{name:<28} {rate:8.0f} samples/s")
    results = {"startup": rows, "loader": rates}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
