"""ShapesConfig.reasoning: a true sentence before the final-answer marker, and nothing else moves.

With the option on, the same seed must give the same scenes, questions and answers (the reasoning
draws no random numbers); with it off, the files must be the ones written before it existed.
"""

import hashlib
import json
import random
import re
from dataclasses import replace

import pytest

from minivlm.constants import FINAL_ANSWER_PREFIX
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.generate import generate, main
from minivlm.data.shapes.questions import ask_count_kind, ask_exists, ask_extreme, ask_relation
from minivlm.data.shapes.scene import Shape
from minivlm.eval.text_metrics import extract_final_answer

CONFIG = ShapesConfig.quick()
# sha256 of the quick config's files at seed 0, written by the generator before the reasoning
# option existed. If you change the output on purpose, bump shapes.VERSION and update these.
OFF_SHA256 = {"sft.json": "102247eb7107afceb045b2356d55e44066288f763798a9aca00f71e602447302",
              "eval.json": "2a068fd2b05f48ab295bbb0ea8068562bbeabbc82000c767026cd2c06ae16ac6",
              "val.json": "3ed07fc769a7f4e10a1a5f6c545a5c3e7adeecb2726cd845136c90eb013e4cb2"}
SIZE = 32
# Hand-placed, every pair far apart on both axes: left to right red circle, green triangle, blue
# circle; top to bottom red circle, blue circle, green triangle.
SCENE = (Shape("circle", "red", 2, 2, 8),  # centre (5.5, 5.5)
         Shape("triangle", "green", 12, 20, 10),  # centre (16.5, 24.5)
         Shape("circle", "blue", 22, 8, 8))  # centre (25.5, 11.5)


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> dict[bool, dict]:
    """{reasoning: paths} for the quick config at seed 0, with the option off and on."""
    root = tmp_path_factory.mktemp("reasoning")
    return {on: generate(root / str(on), seed=0, config=replace(CONFIG, reasoning=on))
            for on in (False, True)}


def test_off_writes_the_files_of_before(both):
    for name, digest in OFF_SHA256.items():
        written = (both[False]["meta"].parent / name).read_bytes()
        assert hashlib.sha256(written).hexdigest() == digest, name


def test_on_puts_reasoning_before_the_same_answers(both):
    off, on = (json.loads(both[flag]["sft"].read_text()) for flag in (False, True))
    assert len(off) == len(on)
    closed = 0
    for record_off, record_on in zip(off, on):
        assert record_off["question_types"] == record_on["question_types"]
        turns_off, turns_on = record_off["conversations"], record_on["conversations"]
        assert turns_off[0::2] == turns_on[0::2]  # the same questions
        for kind, answer_off, answer_on in zip(record_on["question_types"], turns_off[1::2],
                                               turns_on[1::2]):
            if kind == "describe":  # open: no reasoning
                assert answer_on == answer_off
                continue
            reasoning, answer = extract_final_answer(answer_on["value"])
            assert answer == extract_final_answer(answer_off["value"])[1]
            assert reasoning and reasoning.endswith(".")
            assert answer_on["value"] == f"{reasoning}\n{FINAL_ANSWER_PREFIX}{answer}"
            closed += 1
    assert closed > 50
    # captions and ReasonSeg do not change
    assert both[False]["pretrain"].read_bytes() == both[True]["pretrain"].read_bytes()
    for path in both[False]["reasonseg_train"].glob("*.json"):
        assert path.read_bytes() == (both[True]["reasonseg_train"] / path.name).read_bytes()


def test_eval_items_carry_reasoning_for_closed_questions(both):
    for split in ("val", "eval"):
        off, on = (json.loads(both[flag][split].read_text()) for flag in (False, True))
        for item_off, item_on in zip(off, on):
            assert item_off["reasoning"] == ""
            assert {k: v for k, v in item_on.items() if k != "reasoning"} == {
                k: v for k, v in item_off.items() if k != "reasoning"}
            assert bool(item_on["reasoning"]) == (item_on["answer_type"] == "CLOSED")


def asked(ask) -> dict[str, str]:
    """question text -> reasoning, over many random streams on the hand-made scene."""
    found = {}
    for seed in range(200):
        question = ask(random.Random(seed), SCENE, SIZE)
        if question:
            found[question.text] = question.reasoning
    return found


def test_reasoning_texts_on_a_hand_made_scene():
    assert asked(ask_count_kind) == {
        "How many circles are there?": "The circles: the red circle and the blue circle.",
        "How many triangles are there?": "The triangles: the green triangle.",
        "How many squares are there?": "I see no square."}
    exists = asked(ask_exists)
    for question, reasoning in exists.items():
        colour = re.fullmatch(r"Is there a (\w+) \w+\?", question)[1]
        assert reasoning == {"red": "The red shapes: the red circle.",
                             "green": "The green shapes: the green triangle.",
                             "blue": "The blue shapes: the blue circle.",
                             "yellow": "I see no yellow shape."}[colour]
    assert asked(ask_extreme) == {
        "Which shape is left-most?":
            "From the left: the red circle, the green triangle and the blue circle.",
        "Which shape is right-most?":
            "From the right: the blue circle, the green triangle and the red circle.",
        "Which shape is top-most?":
            "From the top: the red circle, the blue circle and the green triangle.",
        "Which shape is bottom-most?":
            "From the bottom: the green triangle, the blue circle and the red circle."}
    relation = asked(ask_relation)
    assert relation["Is the red circle left of the blue circle?"] == (
        "From the left: the red circle, then the blue circle.")
    assert relation["Is the green triangle above the red circle?"] == (
        "From the top: the red circle, then the green triangle.")
    assert len(relation) > 12


def test_command_line_flag(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--quick", "--reasoning", "--num-test", "10"])
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["config"]["reasoning"] is True
    items = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert items[0]["question_type"] == "count" and items[0]["reasoning"].startswith("I see the ")
