"""The frozen encoders' feature caches a stage trains with (data/feature_cache.py).

  --cache-image-features      a frozen vision tower's patch tokens replace the pixels
  --seg-image-encoder sam     SAM's image embedding of each mask's image (LISA's frozen ViT)
Each cache's namespace names the encoder's weights (their fingerprint) and its preprocessing, so
an entry is served only to the same encoder on the same image. Before the dataset is built every
rank encodes its share of the images (the i-th image on rank i mod world size) and waits for the
others; the dataset then finds every entry present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from minivlm.data.feature_cache import FeatureCache, default_cache_root, module_fingerprint
from minivlm.data.images import ImageProcessor, load_image
from minivlm.models.sam_transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_preprocess
from minivlm.models.vlm import VLM
from minivlm.train.config import TrainConfig
from minivlm.train.distributed import DistributedEnv, barrier

# Bump when what an encoder is given changes in a way the namespace does not show.
PREPROCESS_VERSION = 1


def _root(train: TrainConfig) -> Path:
    return Path(train.feature_cache) if train.feature_cache else default_cache_root()


def tower_feature_cache(model: VLM, processor: ImageProcessor, train: TrainConfig,
                        env: DistributedEnv) -> FeatureCache | None:
    """The frozen tower's cache (--cache-image-features), or None."""
    if not train.cache_image_features:
        return None
    if any(p.requires_grad for p in model.vision.parameters()):
        raise ValueError("--cache-image-features needs a frozen vision tower (leave 'vision' "
                         "out of --train)")
    tower = model.vision.to(env.device).eval()

    @torch.no_grad()
    def encode(path: Path) -> torch.Tensor:
        pixels = processor(load_image(path, max_pixels=train.max_image_pixels))
        return tower(pixels.to(env.device))  # (tiles, P, Dv)

    namespace = (f"tower v{PREPROCESS_VERSION} weights={module_fingerprint(tower)} "
                 f"size={processor.image_size} tiles={processor.max_tiles} "
                 f"mean={processor.mean.ravel().tolist()} std={processor.std.ravel().tolist()}")
    return FeatureCache(_root(train), namespace, encode)


def seg_image_cache(model: VLM, train: TrainConfig,
                    env: DistributedEnv) -> FeatureCache | None:
    """SAM's image embeddings for the mask decoder (--seg-image-encoder sam), or None."""
    head = model.seg_head
    if head is None or getattr(head, "image_encoder", None) is None:
        return None
    encoder = head.image_encoder.to(env.device).eval()

    @torch.no_grad()
    def encode(path: Path) -> torch.Tensor:
        image = np.asarray(load_image(path, max_pixels=train.max_image_pixels))  # (H, W, 3)
        pixels = sam_preprocess(image, encoder.img_size).to(env.device)  # (3, S, S)
        return encoder(pixels[None])[0]  # (C, S/16, S/16)

    namespace = (f"sam v{PREPROCESS_VERSION} weights={module_fingerprint(encoder)} "
                 f"size={encoder.img_size} mean={SAM_PIXEL_MEAN} std={SAM_PIXEL_STD}")
    return FeatureCache(_root(train), namespace, encode)


def warm(cache: FeatureCache | None, paths: Iterable[Path], env: DistributedEnv) -> None:
    """Encode every image of `paths` that is not cached yet, split over the ranks."""
    if cache is None:
        return
    paths = sorted(set(paths))
    for path in paths[env.rank::env.world_size]:
        try:
            cache.ensure(path)
        except ValueError:
            pass  # a bad image: the dataset names its record (or skips it under --skip-bad)
    barrier(env)
