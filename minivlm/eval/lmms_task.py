"""A Chiron-format eval JSON (what eval.py's --vqa-json-path reads, such as the synthetic world's
eval split) as two lmms-eval tasks, so that lmms-eval's own evaluator scores a checkpoint on it:

    python -m minivlm.eval.lmms_task --vqa-json-path data/shapes/eval.json --out runs/lmms_tasks
    python -m lmms_eval --model minivlm --model_args pretrained=runs/seg \
        --include_path runs/lmms_tasks --tasks minivlm_vqa,minivlm_vqa_mc

  minivlm_vqa     generate_until over every item, in file order (so eval.py's batches): the
                  greedy output, scored as eval.py scores it (normalised exact match of what
                  follows "### The final answer is:", no marker counts wrong); `closed_accuracy`
                  is eval.py's "closed_accuracy" on the same checkpoint (tests/test_lmms.py).
  minivlm_vqa_mc  multiple_choice over the CLOSED items: the choices are the reference answers
                  the file gives to questions of the same question_type, each written as the
                  model answers ("### The final answer is: X"); the most likely one is the pick
                  (`acc`).

The YAMLs are written, not shipped, because they must name the data file and the image folder:
lmms-eval resolves a relative data file against the YAML's folder, and an image folder not at
all. The functions they name are below, imported by module path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from minivlm.constants import FINAL_ANSWER_PREFIX
from minivlm.data.images import load_image
from minivlm.data.readers import resolve_image
from minivlm.data.sample import string_list
from minivlm.errors import run_cli
from minivlm.eval.text_metrics import answers_match, extract_final_answer
from minivlm.files import write_text_atomic

DEFAULT_NAME = "minivlm_vqa"
# eval.py's VQA default (the reference's); generate cuts it to what the context leaves.
DEFAULT_MAX_NEW_TOKENS = 1024

_COMMON = """\
# Written by `python -m minivlm.eval.lmms_task` for {source}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
doc_to_visual: !function minivlm.eval.lmms_task.doc_to_visual
doc_to_text: !function minivlm.eval.lmms_task.doc_to_text
lmms_eval_specific_kwargs:
  default:
    image_dir: {image_dir}
"""
GENERATE_YAML = _COMMON + """\
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
  # minivlm hands a benchmark the text after "### The final answer is:"; this task scores the
  # marker itself, as eval.py does, so it asks for the whole output.
  final_answer_only: false
process_results: !function minivlm.eval.lmms_task.process_results
metric_list:
  - metric: closed_accuracy
    aggregation: mean
    higher_is_better: true
"""
CHOICE_YAML = _COMMON + """\
output_type: multiple_choice
process_docs: !function minivlm.eval.lmms_task.closed_with_choices
doc_to_choice: !function minivlm.eval.lmms_task.doc_to_choice
doc_to_target: !function minivlm.eval.lmms_task.doc_to_choice_index
# The choice is the whole answer turn: no separator before it.
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


# ---------------------------------------------------------------------------- the documents
def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict) -> list:
    """The item's images, found and decoded as eval.py finds and decodes them."""
    where = f"item {doc['id']}"
    names = string_list(doc["img_name"], "img_name", where)
    image_dir = Path(lmms_eval_specific_kwargs["image_dir"])
    return [load_image(resolve_image(name, image_dir, where)) for name in names]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    """eval.py's verdict on a CLOSED item (an output without the marker has no answer, hence is
    wrong); OPEN items give no number (eval.py scores them by BERTScore)."""
    if doc["answer_type"] != "CLOSED":
        return {}
    _, answer = extract_final_answer(results[0])
    return {"closed_accuracy": float(answers_match(answer, doc["answer"]))}


def _choice_group(doc: dict) -> str:
    return doc.get("question_type") or doc["answer_type"]


def closed_with_choices(dataset):
    """The CLOSED items, each with `choices`: the distinct reference answers that the file gives
    to its question_type (its answer_type when it has none), sorted."""
    closed = dataset.filter(lambda doc: doc["answer_type"] == "CLOSED")
    groups: dict[str, set[str]] = {}
    for doc in closed:
        groups.setdefault(_choice_group(doc), set()).add(doc["answer"])
    return closed.map(lambda doc: {"choices": sorted(groups[_choice_group(doc)])})


def doc_to_choice(doc: dict) -> list[str]:
    return [FINAL_ANSWER_PREFIX + choice for choice in doc["choices"]]


def doc_to_choice_index(doc: dict) -> int:
    return doc["choices"].index(doc["answer"])


# ---------------------------------------------------------------------------- the YAMLs
def write_tasks(vqa_json: str | Path, out_dir: str | Path, name: str = DEFAULT_NAME,
                image_dir: str | Path | None = None,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[Path]:
    """Write `name`.yaml and `name`_mc.yaml into `out_dir` (lmms-eval's --include_path) for the
    Chiron-format file `vqa_json`, whose image names start at `image_dir` (default: the file's
    folder, as in eval.py). Returns the two paths."""
    vqa_json = Path(vqa_json).resolve()
    if not vqa_json.is_file():
        raise ValueError(f"{vqa_json}: no such file (a Chiron-format eval JSON is expected)")
    image_dir = Path(image_dir).resolve() if image_dir is not None else vqa_json.parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, template in ((name, GENERATE_YAML), (f"{name}_mc", CHOICE_YAML)):
        # JSON strings are valid YAML scalars: any path, quoted and escaped.
        text = template.format(source=vqa_json, task=task, data_file=json.dumps(str(vqa_json)),
                               image_dir=json.dumps(str(image_dir)),
                               max_new_tokens=max_new_tokens)
        paths.append(out_dir / f"{task}.yaml")
        write_text_atomic(paths[-1], text)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqa-json-path", required=True, help="Chiron-format eval JSON")
    parser.add_argument("--out", required=True, help="folder for the YAMLs (--include_path)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="task name (and NAME_mc)")
    parser.add_argument("--image-dir", help="where img_name paths start (default: the JSON's "
                                            "folder)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    paths = write_tasks(args.vqa_json_path, args.out, args.name, args.image_dir,
                        args.max_new_tokens)
    print("\n".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    run_cli(main)
