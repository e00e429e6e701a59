"""The model behind the web demo (minivlm/web.py lays out the page around it): load a checkpoint,
describe it, and answer one request: check the uploads and the question, stream the answer token
by token, and decode a mask for each [SEG].

No gradio here, so the tests drive a request directly, and every bad input (a file that is not an
image, one over the pixel budget, images and `<image>` placeholders that do not pair up, a prompt
longer than the context) ends that request with one readable line, never the server.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from minivlm.constants import IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.images import MAX_IMAGE_PIXELS, ImageProcessor, load_image
from minivlm.data.sample import Sample, check_sample
from minivlm.data.shapes.scene import Shape, render
from minivlm.errors import one_line
from minivlm.eval.inference import mask_overlay, segment_samples, stream_answer
from minivlm.load import load_vlm
from minivlm.quant.swap import prepare_quantized

# Questions in the synthetic world's own phrasing (data/shapes/questions.py, data/reasonseg.py).
EXAMPLE_QUESTIONS = (
    "Which shape is a square? Please output segmentation mask.",
    "What colour is the circle?",
    "How many shapes are there?",
    "Is there a red triangle?",
    "Describe the image.",
)
# Hand-placed scenes, so that every example question has one answer (a square, one circle...).
EXAMPLE_SCENES = {
    "scene_a": (Shape("square", "red", 3, 4, 11), Shape("circle", "blue", 18, 17, 12)),
    "scene_b": (Shape("triangle", "red", 2, 18, 12), Shape("circle", "green", 17, 3, 11),
                Shape("square", "yellow", 19, 19, 10)),
}
EXAMPLE_IMAGE_SIZE = 32  # the synthetic world's image side (ShapesConfig.image_size)
DISPLAY_SIDE = 256  # overlays of small images are enlarged (nearest) to at least this side


@dataclass
class Reply:
    """What the page shows after each step of a request."""

    answer: str = ""
    overlays: list[Image.Image] = field(default_factory=list)  # one per [SEG], in order
    status: str = ""


def write_example_images(out_dir: str | Path) -> list[Path]:
    """The example scenes as PNG files in `out_dir`, for the page's examples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, scene in EXAMPLE_SCENES.items():
        render(scene, EXAMPLE_IMAGE_SIZE).save(out_dir / f"{name}.png")
        paths.append(out_dir / f"{name}.png")
    return paths


def placeholder_prefix(num_images: int) -> str:
    """The `<image>` placeholders put before a question that has none, as the synthetic data
    writes them (data/shapes/writers.py: one image alone, two as "Image 1: ... Image 2: ...")."""
    if num_images == 1:
        return f"{IMAGE_TOKEN}\n"
    return "".join(f"Image {i}: {IMAGE_TOKEN}\n" for i in range(1, num_images + 1))


def for_display(image: Image.Image) -> Image.Image:
    """Enlarged by a whole factor with nearest-neighbour, so a 32-px mask stays crisp on screen."""
    factor = -(-DISPLAY_SIDE // max(image.size))  # ceil
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class WebModel:
    """A checkpoint ready to answer: `respond` is one request of the page."""

    def __init__(self, model_path: str, device: str = "cpu",
                 max_image_pixels: int = MAX_IMAGE_PIXELS, quantize: str = "",
                 quantize_group_size: int = 64):
        # LoRA adapters merged: inference wants plain weights (as chat and eval load them).
        self.model, self.tokenizer, self.run_config = load_vlm(model_path, device,
                                                               merge_lora=True)
        prepare_quantized(self.model.eval(), quantize, quantize_group_size)
        self.processor = ImageProcessor.for_tower(self.model.vision)
        self.model_path = str(model_path)
        self.max_image_pixels = max_image_pixels

    def describe(self) -> str:
        """Markdown: where the model came from, its parameters per module and its main sizes."""
        counts = {name: sum(p.numel() for p in module.parameters())
                  for name, module in self.model.named_children()}
        total = sum(p.numel() for p in self.model.parameters())  # a tied tensor counts once
        lm, vision = self.model.config.lm, self.model.config.vision
        parts = ", ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in counts.items())
        seg = "yes" if self.model.seg_head is not None else "no"
        return (f"`{self.model_path}` (stage `{self.run_config.get('stage', '?')}`): "
                f"**{total:,} parameters** ({parts})  \n"
                f"LM: {lm.num_layers} layers, width {lm.dim}, {lm.num_heads} heads "
                f"({lm.num_kv_heads} KV), vocabulary {lm.vocab_size:,}, context "
                f"{lm.max_seq_len:,} · vision: `{vision.model_name}` at {vision.image_size} px, "
                f"{self.model.image_tokens_per_tile} tokens per image · projector "
                f"`{self.model.config.projector.kind}` · [SEG] mask head: {seg} · chat template "
                f"`{self.tokenizer.template.name}`")

    def read_request(self, paths: list[str], question: str) -> tuple[Sample, list[Image.Image]]:
        """The request as a Sample and its decoded images; a one-line ValueError otherwise."""
        paths = [Path(p) for p in paths or []]
        question = (question or "").strip()
        if not question:
            raise ValueError("type a question first")
        images = []
        for path in paths:
            try:
                images.append(load_image(path, max_pixels=self.max_image_pixels))
            except ValueError as error:  # the upload's temporary path means nothing to the user
                raise ValueError(one_line(error).replace(str(path), path.name)) from None
        if paths and IMAGE_TOKEN not in question:
            question = placeholder_prefix(len(paths)) + question
        # check_sample owns the rule that placeholders and images pair up one to one; the empty
        # assistant turn only completes the conversation it checks (prompts drop it).
        sample = Sample(images=paths, turns=[{"role": "user", "content": question},
                                             {"role": "assistant", "content": ""}],
                        source="the question")
        try:
            check_sample(sample)
        except ValueError as error:
            raise ValueError(f"{error} (or leave {IMAGE_TOKEN} out of the question: each image "
                             "then goes before it)") from None
        return sample, images

    def respond(self, paths: list[str], question: str, segment: bool = False,
                temperature: float = 0.0, top_p: float = 1.0,
                max_new_tokens: int = 64) -> Iterator[Reply]:
        """Replies as the answer grows, then one with the masks. With `segment`, an answer
        without [SEG] still gets a mask: the answer with [SEG] appended is fed back
        (teacher-forced, as `eval.py --seg-answer teacher_forced`), so even a weak model shows
        what its mask decoder sees."""
        answer = ""
        try:
            sample, images = self.read_request(paths, question)
            start = time.perf_counter()
            num_tokens = 0
            top_p = float(top_p) if top_p < 1 else None  # 1 keeps every token: no filtering
            for num_tokens, answer in enumerate(stream_answer(
                    self.model, self.tokenizer, self.processor, sample, int(max_new_tokens),
                    float(temperature), top_p), start=1):
                yield Reply(answer, [], f"answering… {num_tokens} tokens")
            seconds = time.perf_counter() - start
            status = (f"{num_tokens} tokens in {seconds:.2f} s "
                      f"({num_tokens / max(seconds, 1e-9):.0f} tokens/s)")
            overlays = []
            if SEG_TOKEN in answer or segment:
                overlays, note = self.masks(sample, images, answer)
                status += f" · {note}"
            yield Reply(answer, overlays, status)
        except (ValueError, OSError) as error:  # bad input; anything else is a bug and is raised
            yield Reply(answer, [], f"Error: {one_line(error)}")

    def masks(self, sample: Sample, images: list[Image.Image],
              answer: str) -> tuple[list[Image.Image], str]:
        """An overlay for each [SEG] of the answer (one appended if it has none), on the first
        image as in training, and a note: where the masks came from and their sizes."""
        if self.model.seg_head is None:
            return [], "this checkpoint has no [SEG] mask head"
        if not images:
            return [], "masks need an image"
        # An untrained model may say <image>; fed back, it would ask for another image's rows.
        fed = answer.replace(IMAGE_TOKEN, "")
        note = "masks from the answer's [SEG]"
        if SEG_TOKEN not in fed:
            fed = f"{fed.rstrip()} {SEG_TOKEN}".lstrip()
            note = "mask from the answer with [SEG] appended (teacher-forced)"
        masks = segment_samples(self.model, self.tokenizer, self.processor, [sample], [fed])[0]
        overlays = [for_display(mask_overlay(images[0], m.numpy())) for m in masks]
        sizes = ", ".join(f"{int(m.sum())}" for m in masks)
        return overlays, f"{note}: {sizes} pixels"
