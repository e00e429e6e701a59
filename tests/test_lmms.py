"""minivlm under lmms-eval: the harness's own evaluator, run on our synthetic eval split with a
briefly trained checkpoint, gives eval.py's closed accuracy and eval.py's outputs item by item;
`loglikelihood` equals a direct computation with the model (VLM.forward's cross-entropy), sign
and all (lmms-eval picks the choice with the lowest value: a negative log-likelihood).

Needs the [harness] extra (`bash scripts/setup.sh --dev` installs it). Without it the module
skips with its reason, except with CI=true, where it fails: CI never passes without running it.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import ImageFile

import eval as eval_script
import train_sft
from minivlm.constants import FINAL_ANSWER_PREFIX, IGNORE_INDEX
from minivlm.data.batch import expand_image_tokens
from minivlm.data.images import ImageProcessor, load_image
from minivlm.load import load_vlm

if importlib.util.find_spec("lmms_eval") is None and os.environ.get("CI") != "true":
    pytest.skip("lmms-eval is not installed: pip install -e '.[harness]'",
                allow_module_level=True)

LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES
import lmms_eval.models  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from minivlm.eval.lmms import LmmsModel  # noqa: E402
from minivlm.eval.lmms_task import write_tasks  # noqa: E402

# Importing lmms-eval (its api/task.py) lets PIL load truncated images, process-wide; put PIL back
# for the rest of the suite, which checks that load_image refuses them.
ImageFile.LOAD_TRUNCATED_IMAGES = LOAD_TRUNCATED_IMAGES

BATCH_SIZE = 8  # eval.py's default, and the same batches on both sides


@pytest.fixture(scope="module", autouse=True)
def quiet_harness(tmp_path_factory):
    """lmms-eval's datasets cache in a temporary folder; one torch thread: on the tiny model a
    second thread costs more than it gains on a busy 2-core machine (training 37 s -> 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The test-preset VLM after 80 SFT steps on single questions from the train split: it
    always writes the final-answer marker and gets some test answers right, not all (a random
    checkpoint never writes the marker, so every answer would be wrong on both sides)."""
    out = tmp_path_factory.mktemp("lmms_run")
    records = []
    for record in json.loads((shapes_dir / "sft.json").read_text()):
        if record.get("task") != "vqa":
            continue
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            if len(answer["value"]) > 60:  # descriptions: long, and slow to learn
                continue
            text = question["value"]
            if "<image>" not in text:
                text = "<image>\n" * len(images) + text
            records.append({"image": record["image"], "conversations": [
                {"from": "human", "value": text}, answer]})
    (out / "questions.json").write_text(json.dumps(records))
    train_sft.main(["--model-preset", "test", "--tokenizer", str(tiny_tokenizer_dir),
                    "--data", str(out / "questions.json"), "--image-dir", str(shapes_dir),
                    "--out-dir", str(out / "run"), "--max-steps", "80", "--batch-size", "16",
                    "--lr", "1e-2", "--warmup-steps", "2", "--log-every", "80"])
    return out / "run"


@pytest.fixture(scope="module")
def task_manager(shapes_dir, tmp_path_factory) -> TaskManager:
    tasks = tmp_path_factory.mktemp("lmms_tasks")
    write_tasks(shapes_dir / "eval.json", tasks)
    # Our two tasks only: indexing lmms-eval's hundreds of task folders is not under test.
    return TaskManager(include_path=str(tasks), include_defaults=False)


@pytest.fixture(scope="module")
def eval_py(trained_run, shapes_dir, tmp_path_factory) -> tuple[dict, list[dict]]:
    """eval.py's summary and per-item records for the trained checkpoint."""
    out = tmp_path_factory.mktemp("eval_py") / "vqa.json"
    summary = eval_script.main(["--vqa-json-path", str(shapes_dir / "eval.json"),
                                "--model-path", str(trained_run), "--output-path", str(out),
                                "--batch-size", str(BATCH_SIZE), "--device", "cpu",
                                "--bertscore-model", "none"])
    return summary, json.loads(out.read_text())[:-1]


def evaluate(model, task: str, task_manager: TaskManager, **kwargs) -> tuple[dict, list[dict]]:
    """lmms-eval's evaluator on one task: (its numbers, its per-item log in item order)."""
    out = simple_evaluate(model=model, tasks=[task], task_manager=task_manager,
                          bootstrap_iters=0, log_samples=True, random_seed=None,
                          numpy_random_seed=None, torch_random_seed=None, **kwargs)
    # (No seeds: the harness would otherwise reseed the whole test session's generators.)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def direct_logprob(model, tokenizer, image_paths: list[Path], question: str,
                   answer: str) -> float:
    """log P(answer | question, images) from VLM.forward's mean cross-entropy on one unpadded
    sequence labelled on the answer's tokens alone (not the end-of-turn marker after them)."""
    user = [{"role": "user", "content": question}]
    prompt, _ = tokenizer.encode_chat(user, add_generation_prompt=True)
    ids, _ = tokenizer.encode_chat(user + [{"role": "assistant", "content": answer}])
    assert ids[:len(prompt)] == prompt and ids[-1] == tokenizer.stop_token_ids[0]
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):-1] + [IGNORE_INDEX]
    processor = ImageProcessor.for_tower(model.vision)
    pixels = [processor(load_image(path)) for path in image_paths]
    ids, labels = expand_image_tokens(ids, labels, tokenizer.image_token_id,
                                      [p.shape[0] * model.image_tokens_per_tile for p in pixels])
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                    torch.tensor([labels]), torch.cat(pixels) if pixels else None)
    return -float(out.ce_loss) * out.num_label_tokens


def image_paths(shapes_dir: Path, doc: dict) -> list[Path]:
    names = doc["img_name"] if isinstance(doc["img_name"], list) else [doc["img_name"]]
    return [shapes_dir / name for name in names]


def instance(request_type: str, arguments: tuple, index: int) -> Instance:
    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": "t", "doc_id": index, "repeats": 1})


def test_lmms_finds_minivlm_by_name():
    assert lmms_eval.models.get_model("minivlm") is LmmsModel, (
        "the lmms_eval.models entry point is missing: pip install -e '.[harness]' again")


def test_lmms_closed_accuracy_equals_eval_py(trained_run, task_manager, eval_py):
    summary, records = eval_py
    # Some right and some wrong, so that equal numbers mean something.
    assert 0 < summary["closed_accuracy"] < 1 and summary["num_missing_marker"] == 0
    results, samples = evaluate(
        "minivlm", "minivlm_vqa", task_manager,
        model_args=f"pretrained={trained_run},device=cpu,batch_size={BATCH_SIZE}")
    assert results["closed_accuracy,none"] == summary["closed_accuracy"]
    assert [s["resps"][0][0] for s in samples] == [r["output"] for r in records]


def test_lmms_multiple_choice_equals_direct_loglikelihoods(trained_run, task_manager, shapes_dir):
    # An object, as nanoVLM passes its model; batches of 3 pad unequal lengths.
    results, samples = evaluate(LmmsModel(pretrained=str(trained_run), device="cpu",
                                          batch_size=3), "minivlm_vqa_mc", task_manager)
    model, tokenizer, _ = load_vlm(trained_run)
    model.eval()
    closed = [d for d in json.loads((shapes_dir / "eval.json").read_text())
              if d["answer_type"] == "CLOSED"]
    right = []
    for doc, sample in zip(closed, samples, strict=True):
        kind = doc["question_type"]
        choices = sorted({d["answer"] for d in closed if d["question_type"] == kind})
        direct = [direct_logprob(model, tokenizer, image_paths(shapes_dir, doc), doc["question"],
                                 FINAL_ANSWER_PREFIX + choice) for choice in choices]
        harness = [response[0][0] for response in sample["resps"]]
        assert harness == pytest.approx([-ll for ll in direct], abs=1e-4)
        right.append(choices[direct.index(max(direct))] == doc["answer"])
    assert results["acc,none"] == pytest.approx(sum(right) / len(right))


def test_lmms_loglikelihood_text_only_and_from_doc_to_target(trained_run):
    model = LmmsModel(pretrained=str(trained_run), device="cpu")
    docs = [{"answer": "### The final answer is: red"}]
    model.task_dict = {"t": {"test": docs}}
    requests = [instance("loglikelihood", ("Which colour?", lambda doc: doc["answer"],
                                           lambda doc: None, 0, "t", "test"), 0),
                instance("loglikelihood", ("Say yes.", " yes", lambda doc: [], 0, "t", "test"), 0)]
    (first, greedy), (second, _) = [result.text for result in model.loglikelihood(requests)]
    lm, tokenizer = model.model, model.tokenizer
    assert -first == pytest.approx(direct_logprob(lm, tokenizer, [], "Which colour?",
                                                  docs[0]["answer"]), abs=1e-4)
    assert -second == pytest.approx(direct_logprob(lm, tokenizer, [], "Say yes.", " yes"),
                                    abs=1e-4)
    assert isinstance(greedy, bool)


def test_lmms_generate_until_hands_benchmarks_the_final_answer(trained_run, shapes_dir, eval_py,
                                                               capsys):
    """Images as paths, two generation settings interleaved (grouped, then put back in order):
    by default the text after the marker, as a benchmark's scorer wants it; stop strings cut;
    a prompt too long for the context gets an empty answer, and the others theirs."""
    _, records = eval_py
    docs = json.loads((shapes_dir / "eval.json").read_text())
    model = LmmsModel(pretrained=str(trained_run), device="cpu", batch_size=BATCH_SIZE)
    model.task_dict = {"t": {"test": docs}}
    settings = [{"until": ["\n\n"]}, {"until": ["answer"], "final_answer_only": False}]
    requests = [instance("generate_until", (doc["question"], settings[i % 2],
                                            lambda doc: [str(p) for p in image_paths(shapes_dir,
                                                                                     doc)],
                                            i, "t", "test"), i) for i, doc in enumerate(docs)]
    requests.insert(3, instance("generate_until", ("many words " * 300, settings[0],
                                                   lambda doc: None, 0, "t", "test"), 0))
    answers = model.generate_until(requests)
    expected = [r["model_answer"] if i % 2 == 0 else r["output"].split("answer")[0]
                for i, r in enumerate(records)]
    assert answers == expected[:3] + [""] + expected[3:]
    assert answers[1] == "### The final "
    assert "1 prompt(s) fill the context (max_seq_len=512)" in capsys.readouterr().err


def test_lmms_bad_model_args_are_one_line_errors(tiny_checkpoint, tmp_path):
    model_class = lmms_eval.models.get_model("minivlm")
    cases = [("", "model_args needs pretrained=PATH"),
             (f"pretrained={tmp_path}", "not a minivlm checkpoint"),
             (f"pretrained={tiny_checkpoint},batch_size=auto",
              "batch_size must be a positive integer, got 'auto'"),
             (f"pretrained={tiny_checkpoint},temperature=0.5", "unknown model_args temperature")]
    if not torch.cuda.is_available():
        cases.append((f"pretrained={tiny_checkpoint},device=cuda", "CUDA is not available"))
    for model_args, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            model_class.create_from_arg_string(model_args)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        write_tasks(tmp_path / "missing.json", tmp_path)
