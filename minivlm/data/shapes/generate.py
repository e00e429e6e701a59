"""The built-in synthetic world: coloured shapes, written in the real data formats.

    python -m minivlm.data.shapes --out data/shapes --seed 0
    python -m minivlm.data.shapes --out /tmp/shapes --quick            # tiny, for tests
    python -m minivlm.data.shapes --out data/shapes --num-train-images 6000 --image-size 64

Files under --out (every path inside the JSON files is relative to the file's folder, so the
ordinary readers load them with no extra argument):
  images/{train,val,test}/NNNNNN.png     the scenes (lossless PNG)
  pretrain.json          LLaVA: one caption per train image
  sft.json               LLaVA: several closed questions (and sometimes "Describe the image.")
                         per train image, answered "### The final answer is: <answer>"
                         (with --reasoning, closed ones "<reasoning>\\n### The final answer
                         is: <answer>"); then two-image records
                         ("Image 1: <image>\\nImage 2: <image>\\n...")
  val.json, eval.json    Chiron-o1 eval format, one question per item, every type equally often;
                         "reasoning" is "" unless --reasoning (then filled for closed items)
  reasonseg/{train,val,test}/NNNNNN.jpg + .json   ReasonSeg (LISA labelme) format
  sem_seg/{train,val,test}/  LISA's sem_seg layout: images/NNNNNN.png, annotations/NNNNNN.png
                         (class index per pixel), classes.txt (background and the shape kinds)
  refer/                 LISA's refer layout: refs(unc).p (splits train, val, test),
                         instances.json (COCO polygons), images/SPLIT_NNNNNN.png
                         (sem_seg and refer: as many scenes per split as ReasonSeg, each from
                         its own random stream, so the other files do not change)
  meta.json              seed, config, counts, and per question type the number of possible
                         answers, chance (1 / that number) and the majority-answer baseline
                         (see stats.py)
Extra keys ride along for analysis and tests: "question_type(s)", "scene(s)" (ground truth),
"target" and "referring_types" (ReasonSeg). The same seed gives byte-identical files.
A scene's split (train/val/test) depends only on its content: see scene.split_of.

The code, leaves first: scene (sampling, drawing, words), reasoning (the reasoning
sentences), questions (questions and answers), config (ShapesConfig),
writers (one split at a time), stats (meta.json's baselines); this file writes the
whole dataset and owns the cache stamp.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from minivlm.cli import add_config_args, config_from_args
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.stats import (population_answers, question_type_stats,
                                      referring_type_counts)
from minivlm.data.shapes.writers import (write_eval, write_reasonseg, write_refer, write_sem_seg,
                                         write_train)
from minivlm.errors import run_cli

GENERATOR = "minivlm.data.shapes"
VERSION = 2  # bump when the output changes, so cached datasets are regenerated (2: sem_seg, refer)
OUTPUTS = ("images", "reasonseg", "sem_seg", "refer", "pretrain.json", "sft.json", "val.json",
           "eval.json", "meta.json")


def _prepare(out: Path, stamp: dict) -> bool:
    """True if `out` already holds this exact dataset; else clear our old outputs (only ours)."""
    meta_path = out / "meta.json"
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("generator") != GENERATOR:
            raise ValueError(f"{meta_path}: not written by {GENERATOR}; "
                             f"refusing to overwrite {out}")
        if previous.get("complete") and all(previous.get(k) == v for k, v in stamp.items()):
            return True
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty and holds no shapes meta.json; "
                         "choose an empty or new folder")
    return False


def generate(out_dir: str | Path, seed: int = 0,
             config: ShapesConfig | None = None) -> dict[str, Path]:
    """Write the whole dataset under `out_dir`, unless the same seed and config are already there.

    Returns the paths by name: pretrain, sft, val, eval (files), reasonseg_{train,val,test},
    sem_seg_{train,val,test}, refer (folders), meta.
    """
    c = config or ShapesConfig()
    out = Path(out_dir)
    paths = {"pretrain": out / "pretrain.json", "sft": out / "sft.json", "val": out / "val.json",
             "eval": out / "eval.json",
             **{f"reasonseg_{s}": out / "reasonseg" / s for s in ("train", "val", "test")},
             **{f"sem_seg_{s}": out / "sem_seg" / s for s in ("train", "val", "test")},
             "refer": out / "refer", "meta": out / "meta.json"}
    stamp = {"generator": GENERATOR, "version": VERSION, "seed": seed, "config": asdict(c)}
    if _prepare(out, stamp):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    # marks a half-written folder as ours
    paths["meta"].write_text(json.dumps({**stamp, "complete": False}))

    pretrain, sft = write_train(out, seed, c)
    val = write_eval(out, "val", seed, c.num_val, c)
    test = write_eval(out, "test", seed, c.num_test, c)
    seg_counts = {"train": c.num_seg_train, "val": c.num_seg_val, "test": c.num_seg_test}
    seg = {s: write_reasonseg(out, s, seed, n, c) for s, n in seg_counts.items()}
    sem_seg = {s: write_sem_seg(out, s, seed, n, c) for s, n in seg_counts.items()}
    refs = write_refer(out, seed, seg_counts, c)
    for name, records in (("pretrain", pretrain), ("sft", sft), ("val", val), ("eval", test)):
        paths[name].write_text(json.dumps(records, indent=1))

    population = population_answers(c, seed)  # the baselines' answer distribution
    meta = {**stamp, "complete": True, "image_size": c.image_size,
            "counts": {"train_images": c.num_train_images, "pretrain": len(pretrain),
                       "sft_records": len(sft),
                       "sft_questions": sum(len(r["question_types"]) for r in sft),
                       "val": len(val), "eval": len(test),
                       **{f"reasonseg_{s}": len(a) for s, a in seg.items()},
                       **{f"sem_seg_{s}": n for s, n in sem_seg.items()},
                       **{f"refer_images_{s}": n for s, n in seg_counts.items()},
                       **{f"refer_refs_{s}": n for s, n in refs.items()}},
            "question_types": {"val": question_type_stats(val, c.max_shapes, population),
                               "eval": question_type_stats(test, c.max_shapes, population)},
            "referring_types": {s: referring_type_counts(anns) for s, anns in seg.items()},
            "files": {name: str(path.relative_to(out)) for name, path in paths.items()}}
    paths["meta"].write_text(json.dumps(meta, indent=1))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (created; must be empty or ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="start from ShapesConfig.quick()'s tiny counts")
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    add_config_args(parser, ShapesConfig, defaults=asdict(ShapesConfig.quick()) if quick else None)
    args = parser.parse_args(argv)
    config = config_from_args(args, ShapesConfig)
    paths = generate(args.out, args.seed, config)
    counts = json.loads(paths["meta"].read_text())["counts"]
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
