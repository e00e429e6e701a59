"""eval.py end to end: the Chiron-o1 fixture, known answers, resume, the judge, bad input,
segmentation."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import minivlm.eval.loop as eval_loop
from minivlm.constants import FINAL_ANSWER_PREFIX
from minivlm.data.readers import read_chiron_eval
from minivlm.data.reasonseg import read_reasonseg_dir
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.errors import run_cli
from minivlm.eval.segmentation import seg_metrics
from minivlm.eval.seg_iou import seg_iou
from minivlm.eval.text_metrics import default_bertscore_model
from minivlm.eval.vqa import vqa_metrics
from minivlm.models.build import build_vlm
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.load import load_vlm

import test_text_metrics
from conftest import tiny_vlm_config
from test_text_metrics import FakeJudge

CHIRON = Path(__file__).resolve().parent / "fixtures" / "chiron_o1_eval"
REFERENCE_FIELDS = ("index", "image_name", "question", "reason_answer", "model_answer",
                    "ground_truth", "answer_type")
judge_server = test_text_metrics.judge_server  # the fake judge's fixture, shared


@pytest.fixture(scope="module")
def long_checkpoint(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny VLM with a 2048-token context: a Chiron prompt (5 images, a long question) is
    ~600 tokens with the shapes tokenizer, more than the shared tiny checkpoint's 512."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    config = tiny_vlm_config(seg=False)
    config.lm.max_seq_len = 2048
    model = build_vlm(config, tokenizer)
    out = tmp_path_factory.mktemp("long_run")
    save_checkpoint(out, 0, model=model,
                    config={"stage": "test", "model": model.config.to_dict(), "lora": None},
                    tokenizer=tokenizer, trainer_state={},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))
    return out


def run_eval(*argv) -> dict:
    """As `python eval.py ...` runs it: a bad input exits 2 with one line (minivlm/errors.py)."""
    return run_cli(eval_script.main, [str(a) for a in argv], prog="eval.py")


def read_output(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    return data[:-1], data[-1]


def patterned_outputs(monkeypatch, real: bool = False):
    """Replace generation with known outputs, by item id: id % 3 == 0 the right answer (dressed
    up: "The RED."), 1 a wrong one, 2 no final-answer marker at all. With `real`, the tiny
    model's own output comes first (so generation still runs)."""
    original = eval_loop.answer_samples

    def fake(model, tokenizer, processor, samples, batch_size=16, max_new_tokens=64,
             progress=None):
        prefix = (original(model, tokenizer, processor, samples, batch_size, max_new_tokens)
                  if real else [""] * len(samples))
        kinds = [int(s.meta["id"]) % 3 for s in samples]
        return [p + (f"{FINAL_ANSWER_PREFIX}The {s.meta['answer'].upper()}." if k == 0 else
                     f"It is.\n{FINAL_ANSWER_PREFIX}purple" if k == 1 else "I cannot tell.")
                for p, s, k in zip(prefix, samples, kinds)]
    monkeypatch.setattr(eval_loop, "answer_samples", fake)


def test_chiron_fixture_end_to_end(long_checkpoint, tmp_path, capsys):
    out = tmp_path / "chiron.json"
    summary = run_eval("--vqa_json_path", CHIRON / "eval_data.json", "--image_dir", CHIRON,
                       "--model_path", long_checkpoint, "--output_path", out,
                       "--max-new-tokens", "8", "--batch-size", "4")
    records, on_disk = read_output(out)
    assert on_disk == json.loads(json.dumps(summary))
    assert "CLOSED Questions Acc" in summary and "OPEN   Questions BERTScore-F1" in summary
    assert summary["complete"] and summary["num_items"] == 10
    assert summary["num_with_marker"] + summary["num_missing_marker"] == 10
    assert len(summary["missing_marker_indices"]) == summary["num_missing_marker"]
    assert set(summary["per_answer_type"]) == {"OPEN"}  # the fixture is all OPEN
    raw = json.loads((CHIRON / "eval_data.json").read_text())
    assert [r["index"] for r in records] == list(range(10))
    for record, item in zip(records, raw):
        assert all(field in record for field in REFERENCE_FIELDS)
        assert (record["ground_truth"] == item["answer"]
                and record["answer_type"] == item["answer_type"])
        names = item["img_name"] if isinstance(item["img_name"], list) else [item["img_name"]]
        assert record["image_name"] == names
        assert record["has_marker"] == (record["model_answer"] is not None)


def test_known_answers_give_exact_numbers(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch):
    import bert_score
    patterned_outputs(monkeypatch)
    out = tmp_path / "vqa.json"
    summary = run_eval("--vqa-json-path", shapes_dir / "eval.json",
                       "--model-path", tiny_checkpoint, "--output-path", out, "--batch-size", "8")
    items = json.loads((shapes_dir / "eval.json").read_text())
    parsed = [it for it in items if it["id"] % 3 != 2]
    right = [it for it in items if it["id"] % 3 == 0]
    closed = [it for it in items if it["answer_type"] == "CLOSED"]
    assert summary["num_missing_marker"] == len(items) - len(parsed)
    assert summary["missing_marker_indices"] == [i for i, it in enumerate(items)
                                                 if it["id"] % 3 == 2]
    # The reference averages over parsed items only; ours counts a missing marker as wrong.
    assert summary["CLOSED Questions Acc"] == len(right) / len(parsed)
    assert summary["overall"]["accuracy"] == len(right) / len(items)
    assert summary["closed_accuracy"] == sum(it["id"] % 3 == 0 for it in closed) / len(closed)
    for question_type, stats in summary["per_question_type"].items():
        group = [it for it in items if it["question_type"] == question_type]
        assert stats["count"] == len(group)
        assert stats["accuracy"] == sum(it["id"] % 3 == 0 for it in group) / len(group)
    # BERTScore: every parsed answer, whatever its type, equals a direct bert_score call.
    cands = [f"The {it['answer'].upper()}." if it["id"] % 3 == 0 else "purple" for it in parsed]
    _, _, f1 = bert_score.score(cands, [it["answer"] for it in parsed],
                                model_type=default_bertscore_model(), num_layers=6)
    assert summary["OPEN   Questions BERTScore-F1"] == pytest.approx(f1.mean().item(), abs=1e-6)
    open_parsed = [k for k, it in enumerate(parsed) if it["answer_type"] == "OPEN"]
    assert summary["open_bertscore_f1"] == pytest.approx(f1[open_parsed].mean().item(), abs=1e-6)

    # The training-time function gives the same numbers from the same samples.
    model, tokenizer, _ = load_vlm(tiny_checkpoint)
    flat = vqa_metrics(model, tokenizer, read_chiron_eval(shapes_dir / "eval.json"),
                       batch_size=8)
    assert flat["closed_accuracy"] == summary["closed_accuracy"]
    assert flat["accuracy"] == summary["overall"]["accuracy"]
    assert flat["accuracy/count"] == summary["per_question_type"]["count"]["accuracy"]
    assert "open_bertscore_f1" not in flat  # BERTScore is off during training by default


def test_resume_gives_same_numbers(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch, capsys):
    patterned_outputs(monkeypatch, real=True)
    common = ("--vqa-json-path", shapes_dir / "eval.json", "--model-path", tiny_checkpoint,
              "--batch-size", "2", "--max-new-tokens", "4", "--limit", "6")
    full = tmp_path / "full.json"
    expected = run_eval(*common, "--output-path", full)
    assert (expected["num_with_marker"] == 4
            and expected["OPEN   Questions BERTScore-F1"] is not None)

    # Interrupted after the first batch: the file holds two records (and no final summary).
    cut = tmp_path / "cut.json"
    records, _ = read_output(full)
    cut.write_text(json.dumps(records[:2]))
    capsys.readouterr()
    resumed = run_eval(*common, "--output-path", cut, "--resume")
    assert "6 items, 2 already done, 4 to go" in capsys.readouterr().err
    assert read_output(cut) == read_output(full)
    assert resumed == expected

    # Stopped by --limit, then resumed without it (BERTScore off: only the bookkeeping differs).
    part = tmp_path / "part.json"
    run_eval(*common[:-1], "2", "--output-path", part, "--bertscore-model", "none")
    run_eval(*common, "--output-path", part, "--bertscore-model", "none", "--resume")
    assert read_output(part)[0] == [{k: v for k, v in r.items() if k != "bertscore_f1"}
                                    for r in records]

    # Resuming someone else's results is refused.
    with pytest.raises(SystemExit) as error:
        run_eval(*common[:-4], "--max-new-tokens", "5", "--limit", "6", "--output-path", part,
                 "--resume")
    assert error.value.code == 2 and "max_new_tokens=4" in capsys.readouterr().err


def test_judge_end_to_end_keeps_the_key_secret(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch,
                                                judge_server):
    patterned_outputs(monkeypatch)
    monkeypatch.setenv("MINIVLM_JUDGE_API_KEY", "sk-env-secret")
    out = tmp_path / "judged.json"
    summary = run_eval("--vqa-json-path", shapes_dir / "eval.json",
                       "--model-path", tiny_checkpoint, "--output-path", out, "--limit", "9",
                       "--judge-url", judge_server, "--judge-model", "fake-judge",
                       "--bertscore-model", "none")
    # The fake judge says Yes only for identical strings: "The RED." vs "red" is No.
    assert summary["settings"]["matcher"] == "judge:fake-judge"
    assert summary["CLOSED Questions Acc"] == 0.0
    assert len(FakeJudge.requests) == 6  # only items with the marker are judged
    assert all(auth == "Bearer sk-env-secret" for _, auth, _ in FakeJudge.requests)
    assert "sk-env-secret" not in out.read_text()

    FakeJudge.requests.clear()
    run_eval("--vqa_json_path", shapes_dir / "eval.json", "--model_path", tiny_checkpoint,
             "--output_path", out, "--limit", "3", "--judge-url", judge_server,
             "--api_key", "sk-flag-secret", "--bertscore-model", "none")
    assert FakeJudge.requests[0][1] == "Bearer sk-flag-secret"
    assert "sk-flag-secret" not in out.read_text()


def test_judge_timeout_exits_2_and_resumes(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch,
                                           judge_server, capsys):
    patterned_outputs(monkeypatch)
    FakeJudge.delay, FakeJudge.fast_requests = 1.0, 2  # the 3rd request hangs
    args = ("--vqa-json-path", shapes_dir / "eval.json", "--model-path", tiny_checkpoint,
            "--output-path", tmp_path / "out.json", "--limit", "6", "--batch-size", "3",
            "--judge-url", judge_server, "--judge-timeout", "0.2", "--judge-retries", "0",
            "--bertscore-model", "none")
    with pytest.raises(SystemExit) as error:
        run_eval(*args)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.value.code == 2 and "unreachable after 1 try: timed out" in message
    records, partial = read_output(tmp_path / "out.json")  # still valid JSON: the first batch
    assert [r["index"] for r in records] == [0, 1, 2] and partial["complete"] is False

    FakeJudge.delay = 0.0
    summary = run_eval(*args, "--resume")
    assert summary["num_items"] == 6 and summary["complete"]


@pytest.mark.parametrize("problem", ["missing image", "not a list", "no checkpoint",
                                     "corrupt checkpoint"])
def test_bad_input_is_one_line_and_exit_2(problem, tiny_checkpoint, tmp_path, capsys):
    items = json.loads((CHIRON / "eval_data.json").read_text())[:1]
    data, model = tmp_path / "data.json", tiny_checkpoint
    if problem == "missing image":
        items[0]["img_name"] = ["images/nowhere.png"] * len(items[0]["img_name"])
    if problem == "not a list":
        items = {"items": items}
    if problem == "no checkpoint":
        model = tmp_path / "nothing"
    if problem == "corrupt checkpoint":
        model = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, model)
        weights = next(model.glob("step_*/model.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    data.write_text(json.dumps(items))
    with pytest.raises(SystemExit) as error:
        run_eval("--vqa-json-path", data, "--image-dir", CHIRON, "--model-path", model,
                 "--output-path", tmp_path / "out.json", "--max-new-tokens", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 2 and len(err[-1:]) == 1 and err[-1].startswith("eval.py: error: ")
    assert "Traceback" not in "\n".join(err)
    expected = {"missing image": "nowhere.png", "not a list": "expected a JSON list",
                "no checkpoint": "not a minivlm checkpoint",
                "corrupt checkpoint": "cannot load"}[problem]
    assert expected in err[-1]


def test_seg_mode(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch):
    # The model's own answers: only the first item says [SEG].
    monkeypatch.setattr(eval_loop, "answer_samples", lambda model, tok, proc, samples, **kw:
                        ["Sure, it is [SEG]."] + ["I see no such shape."] * (len(samples) - 1))
    seg_dir, out = shapes_dir / "reasonseg" / "test", tmp_path / "seg.json"
    summary = run_eval("--seg-dir", seg_dir, "--model-path", tiny_checkpoint, "--output-path", out,
                       "--save-examples", "3", "--batch-size", "2")
    samples = read_reasonseg_dir(seg_dir)
    assert summary["num_items"] == len(samples) == 3
    assert summary["seg_token_rate"] == pytest.approx(2 / 3)  # batches of 2: items 0 and 2 say it

    # The saved masks are the predictions scored: recomputing from the PNGs gives the summary.
    examples = tmp_path / "seg_examples"
    predicted = [np.asarray(Image.open(examples / f"{i:05d}_{s.meta['id']}_mask.png")) // 255
                 for i, s in enumerate(samples)]
    expected = seg_iou([torch.from_numpy(p.astype(np.uint8)) for p in predicted],
                       [s.masks[0] for s in samples])
    # Masks come from the model's own answers: an answer without [SEG] predicts nothing.
    assert predicted[1].sum() == 0
    assert summary["giou"] == pytest.approx(expected["giou"], abs=1e-12)
    assert summary["ciou"] == pytest.approx(expected["ciou"], abs=1e-12)
    # The overlay is the image where the mask is 0 and red-tinted where it is 1.
    image = np.asarray(Image.open(samples[0].images[0]).convert("RGB")).astype(int)
    overlay_path = examples / f"00000_{samples[0].meta['id']}_overlay.png"
    overlay = np.asarray(Image.open(overlay_path)).astype(int)
    on = predicted[0] == 1
    assert (overlay[~on] == image[~on]).all()
    assert (overlay[on][:, 0] >= image[on][:, 0]).all()

    # The training-time function agrees.
    model, tokenizer, _ = load_vlm(tiny_checkpoint)
    metrics = seg_metrics(model, tokenizer, samples, batch_size=2)
    assert metrics == {"giou": summary["giou"], "ciou": summary["ciou"],
                       "seg_token_rate": summary["seg_token_rate"]}
