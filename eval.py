"""Evaluate a checkpoint: VQA (closed accuracy, BERTScore F1) or reasoning segmentation (gIoU,
cIoU).

VQA, on a Chiron-o1 eval JSON (the flags of the Chiron-o1 eval script work too, underscores and
all; a judge reads its API key from $MINIVLM_JUDGE_API_KEY):

    python eval.py --vqa-json-path data/shapes/eval.json --model-path runs/sft \
        --output-path out.json
    python eval.py --vqa_json_path eval_data.json --image_dir images/ --model_path runs/sft \
        --output_path out.json [--judge-url https://api.deepseek.com]

Segmentation, on a ReasonSeg folder (NAME.jpg + NAME.json), with masks and overlays of 8 items:

    python eval.py --seg-dir data/shapes/reasonseg/test --model-path runs/seg \
        --output-path seg.json --save-examples 8

It scores both of LISA's protocols from one generation per item (--seg-answer both): "giou" and
"ciou" from the masks of the model's own answer (as in chat), and "teacher_forced": {"giou",
"ciou"} from LISA's validation, which feeds "Sure, it is [SEG]." (one more forward pass).
--seg-answer generated or teacher_forced scores one of them, under "giou" and "ciou".

The output file is a JSON list: one record per item, then the summary. The VQA summary starts with
the reference's "CLOSED Questions Acc" and "OPEN   Questions BERTScore-F1", computed as its script
does (over the items whose output has "### The final answer is:", whatever their answer_type), and
goes on with what the reference leaves out: how many items lacked the marker (it drops them
silently), and accuracy (a missing marker counts wrong) and BERTScore per answer_type and
question_type. Correctness is normalised exact match unless a judge is configured (--judge-url);
the reference's judge is deepseek-chat, which a Chiron-style --api_key without --judge-url selects.
BERTScore uses the offline MiniLM by default (--bertscore-model roberta-large for the reference's).

The file is rewritten atomically after every batch (with a "complete": false summary of the items
so far); --resume continues an interrupted run and ends with the same numbers. Bad input (missing
image, unreadable checkpoint, judge unreachable, a JSON that is not a list) stops with one line
and exit code 2; what is on disk stays valid JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minivlm.constants import MASK_IGNORE
from minivlm.cli import add_config_args, config_from_args, underscore_aliases
from minivlm.data.images import load_image
from minivlm.data.masks import decode_masks
from minivlm.data.readers import read_chiron_eval
from minivlm.data.reasonseg import read_reasonseg_dir
from minivlm.devices import add_device_arg, resolve_device
from minivlm.errors import run_cli
from minivlm.eval.inference import mask_overlay
from minivlm.eval.judge import REFERENCE_URL, Judge, JudgeConfig
from minivlm.eval.loop import question_text
from minivlm.eval.segmentation import ANSWER_MODES, iter_seg_batches, summarize_seg
from minivlm.eval.vqa import BertScoreConfig, add_bertscore, iter_vqa_batches, summarize_vqa
from minivlm.files import write_text_atomic
from minivlm.load import load_vlm
from minivlm.quant.swap import add_quantize_args, prepare_quantized
from minivlm.weights.checkpoint import resolve_checkpoint

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--vqa-json-path", help="Chiron-o1 eval JSON (VQA mode)")
    mode.add_argument("--seg-dir",
                      help="ReasonSeg folder of NAME.jpg + NAME.json (segmentation mode)")
    parser.add_argument("--image-dir",
                        help="where img_name paths start (default: the JSON's folder)")
    parser.add_argument("--model-path", required=True,
                        help="checkpoint directory or run directory")
    parser.add_argument("--output-path", required=True,
                        help="results JSON (records, then the summary)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int,
                        help="VQA: default 1024 (the reference's); segmentation: default 32")
    parser.add_argument("--limit", type=int, default=0,
                        help="evaluate only the first N items (0: all)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-path")
    add_device_arg(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    add_quantize_args(parser)
    parser.add_argument("--save-examples", type=int, default=0, metavar="N",
                        help="segmentation: save mask PNGs and red overlays of the first N items "
                             "(the masks scored under giou: the own answer's, unless "
                             "--seg-answer teacher_forced)")
    parser.add_argument("--examples-dir", help="default: <output-path without .json>_examples")
    parser.add_argument("--seg-answer", choices=ANSWER_MODES, default="both",
                        help="segmentation: masks from the model's own answer (generated, as in "
                             "chat), from LISA's fed-in \"Sure, it is [SEG].\" (teacher_forced, "
                             "LISA's validation), or both from one generation (default: giou/"
                             "ciou are the own answer's, teacher_forced.giou/ciou LISA's)")
    parser.add_argument("--api-key",
                        help="judge API key (Chiron compatibility; prefer the environment "
                             "variable named by --judge-api-key-env: a flag shows in `ps`)")
    add_config_args(parser, JudgeConfig, prefix="judge")
    add_config_args(parser, BertScoreConfig, prefix="bertscore")
    return parser.parse_args(underscore_aliases(sys.argv[1:] if argv is None else argv))


def make_judge(args: argparse.Namespace) -> Judge | None:
    config = config_from_args(args, JudgeConfig, "judge")
    if not config.url and args.api_key:
        config.url = REFERENCE_URL  # a Chiron command line: the reference's judge
    if not config.url:
        return None
    if args.api_key:
        print(f"note: --api-key shows in the process list and shell history; prefer "
              f"${config.api_key_env}", file=sys.stderr)
    judge = Judge(config.url, config.model, config.api_key_env, config.timeout, config.retries,
                  config.temperature, api_key=args.api_key)
    print(f"judge: {config.model} at {judge.url}", file=sys.stderr)  # never the key
    return judge


def load_model(path: str, device: str, quantize: str = "", group_size: int = 64):
    resolve_checkpoint(path)  # its own one-line error for a folder that is not a checkpoint
    try:
        model, tokenizer, _ = load_vlm(path, device=device, merge_lora=True)
    except Exception as error:  # corrupt weights, bad config...: one line naming the checkpoint
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(f"{path}: cannot load the checkpoint "
                         f"({type(error).__name__}: {detail})") from None
    return prepare_quantized(model.eval(), quantize, group_size), tokenizer


def read_previous(path: Path, samples: list, settings: dict) -> dict[int, dict]:
    """The records of an earlier run of the same eval, by index (for --resume)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: cannot resume, not valid JSON "
                         f"({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: cannot resume, expected a JSON list of records")
    summary = data[-1] if data and isinstance(data[-1], dict) and "settings" in data[-1] else {}
    for key, value in summary.get("settings", {}).items():
        if settings.get(key) != value:
            raise ValueError(f"{path}: cannot resume, it was made with {key}={value!r}, "
                             f"this run has {settings.get(key)!r} "
                             "(drop --resume to start again)")
    previous = {}
    for record in data:
        if not (isinstance(record, dict) and "index" in record):
            continue
        index = record["index"]
        if not (isinstance(index, int) and 0 <= index < len(samples)
                and record.get("question") == question_text(samples[index])):
            raise ValueError(f"{path}: cannot resume, record {index} does not match item "
                             f"{index} of the data (drop --resume to start again)")
        previous[index] = record
    return previous


def write_results(path: Path, records: dict[int, dict], summary: dict) -> None:
    """Records in item order, then the summary; temp file + os.replace, so never half-written."""
    items = [records[i] for i in sorted(records)]
    write_text_atomic(path, json.dumps(items + [summary], indent=1, ensure_ascii=False) + "\n")


def save_example(folder: Path, record: dict, image_path: Path, predicted: list,
                 targets: list) -> None:
    """Per [SEG]: the predicted mask (white on black), the target, and a red overlay of the
    prediction on the image."""
    folder.mkdir(parents=True, exist_ok=True)
    image = load_image(image_path)
    stem = f"{record['index']:05d}_{Path(record['image_name']).stem}"
    for k, (mask, target) in enumerate(zip(predicted, targets)):
        mask = np.asarray(mask, dtype=np.uint8)  # (H, W) 0/1
        suffix = f"_{k}" if len(predicted) > 1 else ""
        Image.fromarray(mask * 255).save(folder / f"{stem}{suffix}_mask.png")
        grey_ignored = np.where(target == 1, 255, np.where(target == MASK_IGNORE, 128, 0))
        Image.fromarray(grey_ignored.astype(np.uint8)).save(folder / f"{stem}{suffix}_target.png")
        mask_overlay(image, mask).save(folder / f"{stem}{suffix}_overlay.png")


def run(args: argparse.Namespace) -> dict:
    output = Path(args.output_path)
    if args.batch_size < 1 or args.limit < 0:
        raise ValueError("--batch-size must be at least 1 and --limit at least 0")
    seg_mode = args.seg_dir is not None
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if seg_mode else 1024
    samples = (read_reasonseg_dir(args.seg_dir) if seg_mode
               else read_chiron_eval(args.vqa_json_path, args.image_dir))
    samples = samples[: args.limit] if args.limit else samples
    if not samples:
        raise ValueError(f"{args.seg_dir or args.vqa_json_path}: no items to evaluate")
    judge = None if seg_mode else make_judge(args)
    bertscore = config_from_args(args, BertScoreConfig, "bertscore")
    device = str(resolve_device(args.device))
    # What changes the per-item results: a resumed run must not mix two of them.
    settings = {"mode": "seg" if seg_mode else "vqa",
                "data": str(Path(args.seg_dir or args.vqa_json_path).resolve()),
                "model_path": str(resolve_checkpoint(args.model_path).resolve()),
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                "matcher": f"judge:{judge.model}" if judge else "normalized_exact_match",
                **({"seg_answer": args.seg_answer} if seg_mode else {}),
                **({"quantize": f"{args.quantize}/{args.quantize_group_size}"}
                   if args.quantize else {})}
    records = read_previous(output, samples, settings) if args.resume else {}
    todo = [i for i in range(len(samples)) if i not in records]
    model, tokenizer = load_model(args.model_path, device, args.quantize,
                                  args.quantize_group_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    summarize = summarize_seg if seg_mode else summarize_vqa
    examples = Path(args.examples_dir or output.with_name(output.stem + "_examples"))
    print(f"{len(samples)} items, {len(records)} already done, {len(todo)} to go", file=sys.stderr)

    autocast = (torch.autocast(torch.device(device).type, dtype=DTYPES[args.dtype])
                if DTYPES[args.dtype] else contextlib.nullcontext())
    with autocast:
        if seg_mode:
            batches = iter_seg_batches(model, tokenizer, samples, todo, args.batch_size,
                                       args.seg_answer, max_new_tokens=args.max_new_tokens)
        else:
            batches = ((batch, None) for batch in iter_vqa_batches(
                model, tokenizer, samples, todo, args.batch_size, args.max_new_tokens, judge))
        for batch, masks in batches:
            for k, record in enumerate(batch):
                records[record["index"]] = record
                if seg_mode and record["index"] < args.save_examples:
                    sample = samples[record["index"]]
                    save_example(examples, record, sample.images[0], masks[k],
                                 decode_masks(sample.masks))
            partial = summarize(list(records.values()))
            write_results(output, records, {**partial, "complete": False, "settings": settings})
            print(f"{len(records)}/{len(samples)} items", file=sys.stderr)

    if not seg_mode:
        add_bertscore(list(records.values()), bertscore, device=device)
    summary = {**summarize(list(records.values())), "complete": True, "settings": settings}
    if seg_mode:
        summary["answer_mode"] = args.seg_answer
    else:
        summary["bertscore_model"] = bertscore.model if bertscore.enabled else None
    write_results(output, records, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    summary = run(parse_args(argv))
    scalars = {k: v for k, v in summary.items()
               if not isinstance(v, (dict, list)) or k == "teacher_forced"}
    print(json.dumps(scalars, indent=1))
    return summary


if __name__ == "__main__":
    run_cli(main)
