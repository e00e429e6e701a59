"""Seconds per segmentation training step with SAM's frozen image encoder: embeddings read from the
feature cache (what train_seg.py does) against the encoder run on every step.

    python bench/sam_cache.py                       # a small SAM-shaped encoder, CPU or CUDA
    python bench/sam_cache.py --encoder vit_b --steps 2 --batch-size 2 --images 6   # ViT-B, 1024 px

A step is forward + mask loss + backward + AdamW of the test-preset VLM whose seg head reads
SAM's encoder (random weights: speed does not depend on them), on a batch of --batch-size
reasoning-segmentation samples. The two modes alternate step by step, so load from other
programs falls on both alike. The cached mode's first epoch (filling the cache) is timed apart.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.data.batch import ChatDataset, collate  # noqa: E402
from minivlm.data.feature_cache import FeatureCache  # noqa: E402
from minivlm.data.images import ImageProcessor, load_image  # noqa: E402
from minivlm.data.readers import read_dataset  # noqa: E402
from minivlm.data.shapes.config import ShapesConfig  # noqa: E402
from minivlm.data.shapes.generate import generate  # noqa: E402
from minivlm.data.load_tokenizer import load_tokenizer  # noqa: E402
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece  # noqa: E402
from minivlm.devices import add_device_arg, resolve_device  # noqa: E402
from minivlm.models.build import build_vlm  # noqa: E402
from minivlm.models.mask_decoder import MASK_DECODER_PRESETS  # noqa: E402
from minivlm.models.presets import preset_config  # noqa: E402
from minivlm.models.sam import SAM_ENCODER_PRESETS, SamConfig, SamEncoderConfig, build_sam  # noqa: E402,E501
from minivlm.models.sam_transforms import sam_preprocess  # noqa: E402
from minivlm.train_tokenizer import dataset_texts  # noqa: E402

SMALL = SamEncoderConfig(img_size=256, patch_size=16, embed_dim=192, depth=6, num_heads=3,
                         window_size=7, global_attn_indexes=(2, 5), out_chans=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="small", choices=["small", *SAM_ENCODER_PRESETS])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--images", type=int, default=24, help="distinct training images")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_device_arg(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    encoder_config = SMALL if args.encoder == "small" else SAM_ENCODER_PRESETS[args.encoder]
    work = Path(tempfile.mkdtemp(prefix="sam_cache_bench_"))

    data = work / "shapes"
    generate(data, seed=0, config=replace(ShapesConfig.quick(), num_seg_train=args.images))
    train_sentencepiece(dataset_texts([str(data / "sft.json")]) * 4, work / "tok", vocab_size=360)
    tokenizer = load_tokenizer(work / "tok")
    torch.manual_seed(0)
    sam_path = work / "sam.pth"
    torch.save(build_sam(SamConfig(encoder=encoder_config,
                                   decoder=MASK_DECODER_PRESETS["sam"])).state_dict(), sam_path)
    config = preset_config("test", seg=True)
    config = replace(config, seg=replace(config.seg, image_encoder="sam",
                                         sam_checkpoint=str(sam_path)))
    model = build_vlm(config, tokenizer).to(device)
    encoder = model.seg_head.image_encoder
    samples = read_dataset(data / "reasonseg" / "train")
    processor = ImageProcessor.for_tower(model.vision)

    @torch.no_grad()
    def encode(path: Path) -> torch.Tensor:
        pixels = sam_preprocess(np.asarray(load_image(path)), encoder.img_size).to(device)
        return encoder(pixels[None])[0]

    cache = FeatureCache(work / "cache", "bench", encode)
    start = time.perf_counter()
    cached_set = ChatDataset(samples, tokenizer, processor, model.image_tokens_per_tile,
                             model.config.lm.max_seq_len, preload_images=False,
                             seg_image_cache=cache)
    fill_seconds = time.perf_counter() - start
    pixel_items = []
    for index, sample in enumerate(samples[: len(cached_set)]):
        item = dict(cached_set[index])
        item["seg_image"] = sam_preprocess(np.asarray(load_image(sample.images[0])),
                                           encoder.img_size)
        pixel_items.append(item)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(items: list[dict]) -> float:
        batch = collate(items, tokenizer.pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["masks"] = [m.to(device) for m in batch["masks"]]
        begin = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    seconds = {"cached": [], "encoder": []}
    n = len(cached_set)
    for k in range(args.steps + 1):  # the first round warms both up and is not counted
        rows = [(k * args.batch_size + i) % n for i in range(args.batch_size)]
        cached_time = step([cached_set[i] for i in rows])  # reads the entries from disk
        encoder_time = step([pixel_items[i] for i in rows])
        if k:
            seconds["cached"].append(cached_time)
            seconds["encoder"].append(encoder_time)
    result = {"encoder": args.encoder, "encoder_config": asdict(encoder_config),
              "device": str(device), "batch_size": args.batch_size, "steps": args.steps,
              "cache_fill_seconds": round(fill_seconds, 3), "images_encoded": cache.misses,
              **{f"{mode}_seconds_per_step": round(float(np.median(t)), 4)
                 for mode, t in seconds.items()}}
    result["speedup"] = round(result["encoder_seconds_per_step"]
                              / result["cached_seconds_per_step"], 2)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
