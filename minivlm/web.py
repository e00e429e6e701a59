"""A web page to talk to a checkpoint: upload images, ask, watch the answer stream in, see masks.

    pip install -e ".[web]"
    python -m minivlm.web --model-path runs/demo/runs/seg [--host 127.0.0.1] [--port 7860]

then open http://127.0.0.1:7860. The answer streams token by token from the KV-cache decoding
loop (models/generation.py); for each [SEG] in it the mask appears beside it, red over the first
image (eval/inference.py's overlay, as eval.py and chat draw it). "segment" appends a [SEG] to an
answer that has none and decodes its mask teacher-forced, so even a weak model shows what its
mask decoder sees. Temperature 0 is greedy. Bad input (a file that is not an image, one over the
pixel budget, more images than `<image>` placeholders) ends that request with one line in the
page; the server goes on serving. Requests run one at a time (one model, one queue). The page
makes no calls out: gradio's analytics are off, and its fonts and scripts are served locally.
What a request does is in minivlm/web_model.py; this file lays out the page.
"""
from __future__ import annotations

import argparse
import html
import os
import tempfile

# Before gradio is imported, which reads it: no telemetry or version checks over the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
try:
    import gradio as gr
except ImportError:  # an optional extra: the core install stays light
    raise SystemExit("minivlm.web needs gradio: pip install -e '.[web]'") from None

from minivlm.data.images import MAX_IMAGE_PIXELS  # noqa: E402 (after gradio's settings)
from minivlm.devices import add_device_arg, resolve_device  # noqa: E402
from minivlm.quant.swap import add_quantize_args  # noqa: E402
from minivlm.errors import run_cli  # noqa: E402
from minivlm.web_model import EXAMPLE_QUESTIONS, WebModel, write_example_images  # noqa: E402

SEGMENT_HELP = ("decode a mask even when the answer has no [SEG]: the answer + [SEG], "
                "teacher-forced")
PLACEHOLDER_HELP = ("Without `<image>` in the question, every image goes before it; with "
                    "`<image>`s, one per uploaded image, in order.")


def status_html(status: str) -> str:
    """The status line as HTML: escaped, since an error may quote `<image>`; an error in bold."""
    if status.startswith("Error:"):
        return f"<b>Error:</b>{html.escape(status[len('Error:'):])}"
    return html.escape(status)


def build_page(web_model: WebModel, example_images: list) -> gr.Blocks:
    """The page: inputs and sampling controls on the left, answer, status and masks on the
    right, the model's description above and examples below."""
    max_tokens = min(512, web_model.model.config.lm.max_seq_len)
    with gr.Blocks(title="minivlm", analytics_enabled=False) as page:
        gr.Markdown("## minivlm\n" + web_model.describe())
        with gr.Accordion("config.json (model)", open=False):
            gr.JSON(web_model.run_config["model"])
        with gr.Row():
            with gr.Column():
                images = gr.File(label="images", file_count="multiple", file_types=["image"],
                                 elem_id="images")
                question = gr.Textbox(label="question", lines=2, elem_id="question",
                                      placeholder=EXAMPLE_QUESTIONS[0], info=PLACEHOLDER_HELP)
                segment = gr.Checkbox(label="segment", info=SEGMENT_HELP, elem_id="segment")
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0, step=0.05, elem_id="temperature",
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p (1 = off)",
                                      elem_id="top_p")
                    max_new_tokens = gr.Slider(1, max_tokens, value=min(64, max_tokens), step=1,
                                               label="max new tokens", elem_id="max_new_tokens")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="answer", lines=3, interactive=False, elem_id="answer")
                status = gr.HTML(elem_id="status")
                # PNG, not gradio's default WebP: a mask's edges stay exact.
                masks = gr.Gallery(label="masks, one per [SEG]", columns=2, height="auto",
                                   preview=False, object_fit="contain", fit_columns=False,
                                   format="png", elem_id="masks")
        gr.Examples(examples=[[[str(example_images[0])], EXAMPLE_QUESTIONS[0], True]]
                    + [[[str(example_images[k % len(example_images)])], q, False]
                       for k, q in enumerate(EXAMPLE_QUESTIONS[1:], start=1)],
                    inputs=[images, question, segment], label="the synthetic world")

        def respond(paths, question, segment, temperature, top_p, max_new_tokens):
            for reply in web_model.respond(paths, question, segment, temperature, top_p,
                                           max_new_tokens):
                yield reply.answer, reply.overlays, status_html(reply.status)

        inputs = [images, question, segment, temperature, top_p, max_new_tokens]
        for trigger in (ask.click, question.submit):
            trigger(respond, inputs, [answer, masks, status])
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True,
                        help="a minivlm checkpoint (run or step directory)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    add_device_arg(parser)
    add_quantize_args(parser)
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="larger images are refused from their header, undecoded")
    parser.add_argument("--max-file-size", default="20mb",
                        help="larger uploads are refused by the server (gradio's max_file_size)")
    args = parser.parse_args(argv)
    web_model = WebModel(args.model_path, str(resolve_device(args.device)),
                         args.max_image_pixels, args.quantize, args.quantize_group_size)
    with tempfile.TemporaryDirectory(prefix="minivlm_web_") as examples_dir:
        page = build_page(web_model, write_example_images(examples_dir))
        # ssr_mode off: server-side rendering would need Node; mcp_server off: a page, no API.
        page.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, max_file_size=args.max_file_size,
            ssr_mode=False, mcp_server=False, show_error=True, footer_links=[])


if __name__ == "__main__":
    run_cli(main)
