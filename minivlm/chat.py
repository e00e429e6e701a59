"""Chat with a checkpoint: an answer for an image (or none) and a prompt; masks for each [SEG].

    python -m minivlm.chat --model-path runs/demo/runs/seg --image cat.png \
        --prompt "Segment the shape with the same colour as the triangle." --out-dir chat_out
    python -m minivlm.chat --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt "What is the capital of France?" [--quantize int8|int4]

Without --prompt it reads prompts line by line from standard input (one conversation, so earlier
turns stay in context). For every [SEG] the answer contains, writes NAME_seg{k}_mask.png (white on
black) and NAME_seg{k}_overlay.png (red over the image) into --out-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minivlm.constants import IMAGE_TOKEN
from minivlm.data.images import ImageProcessor, load_image
from minivlm.data.sample import Sample
from minivlm.devices import add_device_arg, resolve_device
from minivlm.errors import run_cli
from minivlm.eval.inference import answer_samples, mask_overlay, segment_samples
from minivlm.load import load_gguf, load_vlm
from minivlm.quant.swap import add_quantize_args, prepare_quantized


class VLMChat:
    """A conversation with a minivlm checkpoint: `ask` appends a turn and returns the answer."""

    def __init__(self, model_path: str, device: str, image: str | None, max_new_tokens: int,
                 quantize: str = "", group_size: int = 64):
        self.model, self.tokenizer, _ = load_vlm(model_path, device, merge_lora=True)
        prepare_quantized(self.model.eval(), quantize, group_size)
        self.processor = ImageProcessor.for_tower(self.model.vision)
        self.images = [Path(image)] if image else []
        self.turns: list[dict] = []
        self.max_new_tokens = max_new_tokens

    def ask(self, prompt: str) -> tuple[str, list[np.ndarray]]:
        if self.images and not self.turns and IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        self.turns.append({"role": "user", "content": prompt})
        sample = Sample(images=self.images, turns=list(self.turns), source="chat")
        (answer,) = answer_samples(self.model, self.tokenizer, self.processor, [sample],
                                   max_new_tokens=self.max_new_tokens)
        self.turns.append({"role": "assistant", "content": answer})
        masks = []
        if self.model.seg_head is not None and self.images and \
                self.tokenizer.seg_token_id in self.tokenizer.encode(answer):
            # Masks of this turn's [SEG]s: the last ones in the whole conversation.
            all_masks = segment_samples(self.model, self.tokenizer, self.processor,
                                        [Sample(images=self.images, turns=self.turns[:-1],
                                                source="chat")], [answer])[0]
            count = self.tokenizer.encode(answer).count(self.tokenizer.seg_token_id)
            masks = [m.numpy() for m in all_masks[-count:]]
        return answer, masks


class TextChat:
    """A plain language model from a GGUF file: text in, text out, through our KV-cache generate."""

    def __init__(self, gguf_path: str, device: str, max_new_tokens: int, quantize: str = "",
                 group_size: int = 64):
        self.model, self.tokenizer = load_gguf(gguf_path)
        prepare_quantized(self.model.to(device).eval(), quantize, group_size)
        self.turns: list[dict] = []
        self.max_new_tokens = max_new_tokens

    def ask(self, prompt: str) -> tuple[str, list[np.ndarray]]:
        self.turns.append({"role": "user", "content": prompt})
        ids, _ = self.tokenizer.encode_chat(self.turns, add_generation_prompt=True)
        device = next(self.model.parameters()).device
        new = self.model.generate(torch.tensor([ids], device=device),
                                  max_new_tokens=self.max_new_tokens,
                                  stop_token_ids=self.tokenizer.stop_token_ids,
                                  pad_token_id=self.tokenizer.pad_id)
        answer = self.tokenizer.decode(new[0].tolist())
        self.turns.append({"role": "assistant", "content": answer})
        return answer, []


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="a minivlm checkpoint (run or step directory)")
    source.add_argument("--gguf", help="a GGUF language model (text only)")
    parser.add_argument("--image", help="image file for the conversation")
    parser.add_argument("--prompt", help="one prompt; without it, prompts are read from stdin")
    parser.add_argument("--out-dir", default="chat_out", help="where mask PNGs are written")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_device_arg(parser)
    add_quantize_args(parser)
    args = parser.parse_args(argv)
    if args.gguf and args.image:
        parser.error("--image needs a VLM checkpoint (--model-path); --gguf is text only")
    device = str(resolve_device(args.device))
    quantize = (args.quantize, args.quantize_group_size)
    chat = (TextChat(args.gguf, device, args.max_new_tokens, *quantize) if args.gguf
            else VLMChat(args.model_path, device, args.image, args.max_new_tokens, *quantize))
    prompts = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    answers = []
    for turn, prompt in enumerate(p for p in prompts if p):
        answer, masks = chat.ask(prompt)
        answers.append(answer)
        print(answer, flush=True)
        if masks:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            image = load_image(args.image)
            stem = f"{Path(args.image).stem}_turn{turn}"
            for k, mask in enumerate(masks):
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_seg{k}_mask.png")
                overlay = out / f"{stem}_seg{k}_overlay.png"
                mask_overlay(image, mask).save(overlay)
                print(f"  [SEG] {k}: {int(mask.sum())} pixels -> {overlay}")
    return answers


if __name__ == "__main__":
    run_cli(main)
