"""eval.py's segmentation mode scores both of LISA's protocols from one generation: the masks of
the model's own answer ("giou", "ciou") and of LISA's fed-in "Sure, it is [SEG]."
("teacher_forced"), each exactly what it gives when run alone."""
import json

import pytest

import eval as eval_script
import minivlm.eval.loop as eval_loop
import minivlm.eval.segmentation as segmentation
from minivlm.data.reasonseg import read_reasonseg_dir
from minivlm.errors import run_cli
from minivlm.eval.segmentation import seg_metrics
from minivlm.load import load_vlm


def own_answers(monkeypatch, calls: dict):
    """Generation replaced by known answers (item 0 of each batch says [SEG], the others do
    not), counting calls, as are the forward passes that decode masks."""
    def answer(model, tokenizer, processor, samples, **kw):
        calls["generate"] += 1
        return ["It is the shape [SEG]."] + ["I see no such shape."] * (len(samples) - 1)

    real_segment = segmentation.segment_samples

    def segment(*args, **kw):
        calls["segment"] += 1
        return real_segment(*args, **kw)
    monkeypatch.setattr(eval_loop, "answer_samples", answer)
    monkeypatch.setattr(segmentation, "segment_samples", segment)


def run_seg(checkpoint, seg_dir, out, *extra) -> tuple[dict, list[dict], dict]:
    summary = run_cli(eval_script.main, [str(a) for a in (
        "--seg-dir", seg_dir, "--model-path", checkpoint, "--output-path", out,
        "--batch-size", "2", *extra)], prog="eval.py")
    data = json.loads(out.read_text())
    return summary, data[:-1], data[-1]


def test_both_protocols_in_one_run_equal_each_alone(tiny_checkpoint, shapes_dir, tmp_path,
                                                    monkeypatch, capsys):
    calls = {"generate": 0, "segment": 0}
    own_answers(monkeypatch, calls)
    seg_dir = shapes_dir / "reasonseg" / "test"
    batches = -(-len(read_reasonseg_dir(seg_dir)) // 2)
    capsys.readouterr()
    both, both_records, on_disk = run_seg(tiny_checkpoint, seg_dir, tmp_path / "both.json")
    printed = json.loads(capsys.readouterr().out)
    # The default: one generation per batch, a forward pass for each protocol.
    assert calls == {"generate": batches, "segment": 2 * batches}
    generated, generated_records, _ = run_seg(tiny_checkpoint, seg_dir, tmp_path / "gen.json",
                                              "--seg-answer", "generated")
    forced, forced_records, _ = run_seg(tiny_checkpoint, seg_dir, tmp_path / "tf.json",
                                        "--seg-answer", "teacher_forced")
    assert calls == {"generate": 3 * batches, "segment": 4 * batches}

    # Named in results.json and in the printed summary.
    assert on_disk == json.loads(json.dumps(both))
    assert (both["answer_mode"], both["settings"]["seg_answer"]) == ("both", "both")
    assert set(both["teacher_forced"]) == {"giou", "ciou"}
    assert printed["teacher_forced"] == both["teacher_forced"] and printed["giou"] == both["giou"]
    assert "teacher_forced" not in generated and "teacher_forced" not in forced

    # Exactly the figures of each protocol alone: top level the own answer's, and LISA's.
    for key in ("giou", "ciou", "seg_token_rate", "num_items", "num_masks"):
        assert both[key] == generated[key]
    assert both["teacher_forced"] == {"giou": forced["giou"], "ciou": forced["ciou"]}
    assert both["seg_token_rate"] == forced["seg_token_rate"] == pytest.approx(2 / 3)
    for record, own, fed in zip(both_records, generated_records, forced_records):
        assert {k: v for k, v in record.items() if k != "teacher_forced"} == own
        assert record["teacher_forced"] == {"iou": fed["iou"], "sums": fed["sums"]}
    # The two protocols differ here (answers without [SEG] predict empty masks), so the
    # comparisons above could not pass by scoring the same masks twice.
    assert [r["iou"] for r in generated_records] != [r["iou"] for r in forced_records]

    # Validation during training gives the same numbers under its own names.
    model, tokenizer, _ = load_vlm(tiny_checkpoint)
    metrics = seg_metrics(model, tokenizer, read_reasonseg_dir(seg_dir), batch_size=2,
                          answer_mode="both")
    assert metrics == {"giou": both["giou"], "ciou": both["ciou"],
                       "seg_token_rate": both["seg_token_rate"],
                       "teacher_forced/giou": forced["giou"],
                       "teacher_forced/ciou": forced["ciou"]}


def test_both_resumes_to_the_same_numbers(tiny_checkpoint, shapes_dir, tmp_path, monkeypatch):
    own_answers(monkeypatch, {"generate": 0, "segment": 0})
    seg_dir = shapes_dir / "reasonseg" / "test"
    full, records, _ = run_seg(tiny_checkpoint, seg_dir, tmp_path / "full.json")
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(records[:2]))  # interrupted after the first batch
    resumed, resumed_records, _ = run_seg(tiny_checkpoint, seg_dir, cut, "--resume")
    assert resumed == full and resumed_records == records
    with pytest.raises(SystemExit):  # a run of one protocol does not continue a run of both
        run_seg(tiny_checkpoint, seg_dir, cut, "--resume", "--seg-answer", "generated")
