"""What the eval reports beside accuracy: standard errors, what was answered against the truth,
the perception probe, and the demo's table and curves built from them."""
import json

import pytest

import eval as eval_script
import minivlm.eval.loop as eval_loop
from minivlm.constants import FINAL_ANSWER_PREFIX
from minivlm.errors import run_cli
from minivlm.demo_report import curves, results_table
from minivlm.eval.scene_probe import describe_probe, parse_description

TRUTH = ("There are 3 shapes: a red circle at the top left, a blue square in the centre and a "
         "green triangle at the bottom right.")


def hand_made_eval(shapes_dir, tmp_path):
    """Ten "Is there ...?" items (five true) and two descriptions, with the model's answers:
    "yes" to four true and three false items, "no" to the rest, one output without a marker."""
    image = json.loads((shapes_dir / "eval.json").read_text())[0]["img_name"]
    image = str(shapes_dir / image) if isinstance(image, str) else str(shapes_dir / image[0])
    items, outputs = [], {}
    said = ["yes"] * 4 + ["no"] + ["yes"] * 3 + ["no", None]
    for k in range(10):
        truth = "yes" if k < 5 else "no"
        items.append(dict(id=k, img_name=image, question="<image>\nIs there a red circle?",
                          reasoning="", answer=truth, answer_type="CLOSED",
                          question_type="exists"))
        outputs[k] = f"{FINAL_ANSWER_PREFIX}{said[k]}" if said[k] else "I cannot tell."
    wrong_kind = TRUTH.replace("blue square", "blue circle")
    for k, answer in ((10, TRUTH), (11, wrong_kind)):
        items.append(dict(id=k, img_name=image, question="<image>\nDescribe the image.",
                          reasoning="", answer=TRUTH, answer_type="OPEN",
                          question_type="describe"))
        outputs[k] = FINAL_ANSWER_PREFIX + answer
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(items))
    return path, outputs


def test_standard_error_answer_table_and_probe_from_a_hand_made_eval(
        tiny_checkpoint, shapes_dir, tmp_path, monkeypatch):
    path, outputs = hand_made_eval(shapes_dir, tmp_path)
    monkeypatch.setattr(eval_loop, "answer_samples",
                        lambda model, tokenizer, processor, samples, *a, **k:
                        [outputs[int(s.meta["id"])] for s in samples])
    summary = run_cli(eval_script.main, ["--vqa-json-path", str(path), "--model-path",
                                         str(tiny_checkpoint), "--output-path",
                                         str(tmp_path / "out.json"), "--bertscore-model", "none"],
                      prog="eval.py")
    exists = summary["per_question_type"]["exists"]
    assert exists["accuracy"] == 0.5  # 4 of 5 yes, 1 of 5 no
    assert exists["standard_error"] == pytest.approx((0.5 * 0.5 / 10) ** 0.5)
    assert exists["answer_distribution"] == {"yes": {"yes": 4, "no": 1},
                                             "no": {"yes": 3, "(no final answer)": 1, "no": 1}}
    assert "answer_distribution" not in summary["per_question_type"]["describe"]  # open
    # one perfect description, one with the square called a circle
    assert summary["perception"] == {"count": 1.0, "colour": 1.0, "kind": 5 / 6,
                                     "position": 1.0, "shape": 5 / 6, "pairs": 0.5}


def test_probe_parses_the_worlds_descriptions_and_scores_each_attribute():
    assert parse_description(TRUTH) == (3, [("red", "circle", "top left"),
                                            ("blue", "square", "centre"),
                                            ("green", "triangle", "bottom right")])
    assert parse_description("a yellow square at the top.") == (1, [("yellow", "square", "top")])
    swapped = ("There are 2 shapes: a red circle at the top right and a blue triangle in the "
               "centre.")
    scores = describe_probe([(swapped, TRUTH), (TRUTH, TRUTH), ("no idea", TRUTH)])
    assert scores["count"] == pytest.approx(1 / 3)  # 2 stated, 0 listed: only TRUTH counts
    assert scores["colour"] == pytest.approx(5 / 9)  # red, blue right in one, all in another
    assert scores["kind"] == pytest.approx(4 / 9)  # circle right, triangle != square
    assert scores["position"] == pytest.approx(4 / 9)  # top right != top left; centre right
    assert scores["shape"] == pytest.approx(3 / 9)
    assert scores["pairs"] == pytest.approx(1 / 3)
    assert describe_probe([]) == {}


def test_demo_report_curves_and_answer_rows(tmp_path):
    sft_curve = [dict(step=5, seconds=2.0, **{"accuracy/count": 0.5, "perception/kind": 0.3}),
                 dict(step=10, seconds=4.0, **{"accuracy/count": 0.7, "closed_accuracy": 0.6})]
    seg_curve = [dict(step=4, seconds=1.0, **{"accuracy/count": 0.8})]
    for stage, steps, curve in (("sft", 10, sft_curve), ("seg", 4, seg_curve)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "results.json").write_text(json.dumps(
            dict(stage=stage, step=steps, seconds=dict(steps=4.0), curve=curve)))
    got = curves([tmp_path / "sft", tmp_path / "seg"])
    assert got["per_question_type"]["count"] == [
        dict(stage="sft", step=5, seconds=2.0, accuracy=0.5),
        dict(stage="sft", step=10, seconds=4.0, accuracy=0.7),
        dict(stage="seg", step=14, seconds=5.0, accuracy=0.8)]  # counted on after SFT
    assert got["perception"]["kind"] == [dict(stage="sft", step=5, seconds=2.0, accuracy=0.3)]
    assert got["closed_accuracy"] == [dict(stage="sft", step=10, seconds=4.0, accuracy=0.6)]

    per_type = {"exists": dict(count=10, accuracy=0.5, standard_error=0.158,
                               answer_distribution={"yes": {"yes": 4, "no": 1},
                                                    "no": {"yes": 3, "no": 2}})}
    results = dict(device="cpu", seconds={"sft": 3.0}, total_seconds=3.0,
                   vqa=dict(closed_accuracy=0.5, open_bertscore_f1=None, per_question_type=per_type,
                            perception={"kind": 0.5}),
                   seg=dict(giou=0.1, ciou=0.2),
                   chance={"exists": dict(answer_type="CLOSED", count=10, chance=0.5,
                                          majority=0.5)})
    table = results_table(results)
    assert "  exists                      10   0.500 ± 0.158   0.500   0.500" in table
    assert "exists        yes: yes 4 no 1 | no: yes 3 no 2" in table
    assert "kind 0.50" in table
