"""Answer scoring: the final-answer split, normalised match, BERTScore, and the LLM judge."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minivlm.eval.judge import Judge, JudgeError
from minivlm.eval.text_metrics import (answers_match, bertscore_f1, default_bertscore_model,
                                  extract_final_answer, normalize_answer)


@pytest.mark.parametrize("text, expected", [
    ("Red.", "red"),
    ("  The   big RED square ", "big red square"),
    ("An apple", "apple"),
    ("three", "3"),
    ("There are Three circles.", "there are 3 circles"),
    ("3.0", "3"),
    ("3.5", "3.5"),
    ("True", "yes"),
    ("yes.", "yes"),
    ("FALSE!", "no"),
    ("the cat's toy", "cats toy"),
    ("left-most", "left most"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, truth, match", [
    ("Red.", "red", True),
    ("the circle", "Circle", True),
    ("3", "three", True),
    ("twelve", "12", True),
    ("two circles", "2 circles", True),
    ("Yes.", "yes", True),
    ("true", "Yes", True),
    ("Yes, it is red.", "yes", True),
    ("No, there is none.", "no", True),
    ("no", "yes", False),
    ("Yes, it is red.", "no", False),
    ("blue", "red", False),
    ("left", "right", False),
    ("3.5", "35", False),
    ("red square", "red", False),
    ("", "red", False),
    ("", "", False),
    (None, "red", False),
])
def test_answers_match(prediction, truth, match):
    assert answers_match(prediction, truth) is match


def test_extract_final_answer():
    assert extract_final_answer("It is round.\n### The final answer is: circle") == (
        "It is round.", "circle")
    assert extract_final_answer("### The final answer is:red") == ("", "red")
    assert extract_final_answer("no marker here ") == ("no marker here", None)
    # a repeated marker: the first one ends the reasoning
    assert extract_final_answer("a ### The final answer is: b ### The final answer is: c") == (
        "a", "b ### The final answer is: c")


def test_bertscore_equals_direct_call():
    import bert_score

    cands = ["a red circle", "Infiltrative gastric adenocarcinoma.", "three", "left"]
    refs = ["the red circle", "Gastric adenocarcinoma with lymph node metastasis.", "3", "right"]
    ours = bertscore_f1(cands + [""], refs + ["blue"], device="cpu")
    _, _, f1 = bert_score.score(cands, refs, model_type=default_bertscore_model(), num_layers=6,
                                device="cpu")
    assert ours == f1.tolist() + [0.0]  # an empty answer scores 0, as bert-score documents
    assert ours[0] > ours[1]


def test_bertscore_unknown_model_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="layer count"):
        bertscore_f1(["a"], ["b"], model_type=str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------- judge
class FakeJudge(BaseHTTPRequestHandler):
    """Answers "Yes" when the model's answer equals the correct one, else "No"; records requests.
    Requests after the first `fast_requests` wait `delay` seconds; the first `failures_left` get
    503."""
    requests: list = []
    delay = 0.0
    fast_requests = 0
    failures_left = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(503)
            return
        if len(type(self).requests) > type(self).fast_requests:
            time.sleep(type(self).delay)
        prompt = body["messages"][0]["content"]
        answer = prompt.split("Model's answer: ")[1].split("\n")[0]
        truth = prompt.split("Correct answer: ")[1].split("\n")[0]
        reply = "Yes." if answer == truth else "No"
        message = {"role": "assistant", "content": reply}
        payload = json.dumps({"choices": [{"message": message}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    FakeJudge.requests, FakeJudge.delay = [], 0.0
    FakeJudge.fast_requests, FakeJudge.failures_left = 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_yes_and_no(judge_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret")
    judge = Judge(judge_server, "fake-model", api_key_env="TEST_JUDGE_KEY", timeout=5, retries=0)
    assert judge.is_correct("What colour?", "red", "red") is True
    assert judge.is_correct("What colour?", "blue", "red") is False
    path, auth, body = FakeJudge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-secret"
    assert body["model"] == "fake-model" and body["temperature"] == 0.9
    assert "sk-secret" not in repr(judge)


def test_judge_retries_busy_server(judge_server):
    FakeJudge.failures_left = 2
    judge = Judge(judge_server, "m", timeout=5, retries=2, backoff=0.01)
    assert judge.is_correct("q", "a", "a") is True
    assert len(FakeJudge.requests) == 3


def test_judge_timeout_is_one_line(judge_server):
    FakeJudge.delay = 1.0
    judge = Judge(judge_server, "m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=r"unreachable after 2 tries: timed out") as error:
        judge.is_correct("q", "a", "a")
    assert "\n" not in str(error.value)
    assert len(FakeJudge.requests) == 2


def test_judge_unreachable_is_one_line():
    # A port nothing listens on (bind one, close it): connection refused, at once.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = Judge(f"http://127.0.0.1:{port}", "m", timeout=1, retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match="unreachable after 2 tries") as error:
        judge.is_correct("q", "a", "a")
    assert "\n" not in str(error.value)
