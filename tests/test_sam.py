"""Our whole SAM (image encoder, prompt encoder, loader, pre/post-processing) against
segment-anything's, with the same weights."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT as SamImageEncoderViT
from segment_anything.modeling import MaskDecoder as SamMaskDecoder
from segment_anything.modeling import PromptEncoder as SamPromptEncoder
from segment_anything.modeling import Sam as SamReference
from segment_anything.modeling import TwoWayTransformer as SamTwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from minivlm.models.mask_decoder import MASK_DECODER_PRESETS, MaskDecoderConfig
from minivlm.models.sam import (
    SAM_ENCODER_PRESETS,
    SamConfig,
    SamEncoderConfig,
    build_sam,
    build_sam_image_encoder,
)
from minivlm.models.sam_checkpoint import (
    infer_sam_encoder_config,
    load_sam,
    no_mask_prompt_encoder,
    read_sam_encoder_config,
)
from minivlm.models.sam_prompt_encoder import PromptEncoder
from minivlm.models.sam_transforms import apply_boxes, apply_coords, resize_longest_side

# 64 px, 8 px patches: an 8 x 8 grid in 3 x 3 windows, so every windowed block pads to 9 x 9.
SMALL = SamEncoderConfig(depth=4, global_attn_indexes=(1,), out_chans=16)
DECODER = MaskDecoderConfig()  # the tiny decoder: 64 wide, as SamEncoderConfig().out_chans


def _reference_encoder(config: SamEncoderConfig) -> SamImageEncoderViT:
    """segment-anything's encoder for `config`, as its build_sam.py passes the arguments."""
    return SamImageEncoderViT(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, out_chans=config.out_chans, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=config.layer_norm_eps), use_rel_pos=True,
        window_size=config.window_size, global_attn_indexes=config.global_attn_indexes,
    )


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every tensor: SAM starts pos_embed and rel_pos at zero and LayerNorms at 1/0,
    which would hide a swapped or unused tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    return module.eval()


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_encoder_matches_segment_anything():
    torch.manual_seed(0)
    reference = _randomise(_reference_encoder(SMALL), seed=1)
    encoder = build_sam_image_encoder(SMALL).eval()
    encoder.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, SMALL.img_size, SMALL.img_size)
    with torch.no_grad():
        want, got = reference(images), encoder(images)
    assert want.shape == (2, 16, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Each piece matters: without the rel-pos bias or the window the output moves.
    encoder.blocks[0].attn.use_rel_pos = False
    with torch.no_grad():
        assert (encoder(images) - want).abs().max() > 1e-2
    encoder.blocks[0].attn.use_rel_pos, encoder.blocks[0].window_size = True, 0
    with pytest.raises(ValueError, match="rel_pos has 5 rows, expected 2 \\* 8 - 1"):
        encoder(images)  # a windowed block's 3x3 offsets cannot cover the whole 8 x 8 grid


@pytest.mark.parametrize("config", [
    SMALL,
    SamEncoderConfig(window_size=4, global_attn_indexes=(0,), num_heads=4, mlp_ratio=2.0),
    SamEncoderConfig(img_size=48, patch_size=4, window_size=0, global_attn_indexes=()),
    SamEncoderConfig(window_size=5, global_attn_indexes=(0, 1), out_chans=8),  # no windowed block
])
def test_infer_encoder_config_from_shapes(config):
    with torch.device("meta"):
        reference = _reference_encoder(config)
    inferred = infer_sam_encoder_config(reference.state_dict(), "encoder.pth")
    if len(config.global_attn_indexes) == config.depth:  # every block global: SAM's window 0
        config = replace(config, window_size=0, global_attn_indexes=())
    assert inferred == config


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_released_sizes_match_segment_anything(name):
    with torch.device("meta"):  # shapes only: no weights allocated
        reference = sam_model_registry[name]()
        sam = build_sam(SamConfig(SAM_ENCODER_PRESETS[name], MASK_DECODER_PRESETS["sam"]))
    assert _shapes(sam) == _shapes(reference)
    assert infer_sam_encoder_config(reference.image_encoder.state_dict(), name) == (
        SAM_ENCODER_PRESETS[name]
    )


def test_load_real_size_vit_b(tmp_path):
    # A full 1024 px forward takes ~24 s in segment-anything and ~12 s here on 2 CPU cores, so
    # the pieces are compared one at a time on the real 64 x 64 grid: the patch embedding, a
    # windowed block (padded to 70 x 70, as SAM's), a global block and the neck; the loaded
    # tensors are compared whole.
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    with torch.no_grad():
        for key, tensor in reference.state_dict().items():
            if "rel_pos" in key or "pos_embed" in key or "norm" in key:
                tensor.add_(0.1 * torch.randn_like(tensor))
    path = tmp_path / "sam_vit_b.pth"
    torch.save(reference.state_dict(), path)
    sam = load_sam(path)
    assert sam.image_encoder.img_size == 1024 and len(sam.image_encoder.blocks) == 12
    ours = sam.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(ours[key], tensor), key
    assert all(p.requires_grad for p in sam.parameters())

    generator = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 1024, 1024, generator=generator)
    tokens = torch.randn(1, 64, 64, 768, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            sam.image_encoder.patch_embed(image) + sam.image_encoder.pos_embed,
            reference.image_encoder.patch_embed(image) + reference.image_encoder.pos_embed,
            atol=1e-5, rtol=0,
        )
        for index in (0, 2):  # block 0 is windowed, block 2 global
            want = reference.image_encoder.blocks[index](tokens)
            torch.testing.assert_close(
                sam.image_encoder.blocks[index](tokens), want, atol=1e-4, rtol=0
            )
        channels_first = tokens.permute(0, 3, 1, 2)
        torch.testing.assert_close(
            sam.image_encoder.neck(channels_first), reference.image_encoder.neck(channels_first),
            atol=1e-5, rtol=0,
        )


def _reference_sam(seed: int = 0) -> SamReference:
    """A small SAM from segment-anything's own classes: 64 px, an 8 x 8 grid, 16 x 16 masks."""
    torch.manual_seed(seed)
    encoder = _reference_encoder(SamEncoderConfig())
    prompt_encoder = SamPromptEncoder(
        embed_dim=64, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=16
    )
    decoder = SamMaskDecoder(
        transformer_dim=64,
        transformer=SamTwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128, num_heads=4),
        iou_head_hidden_dim=64,
    )
    sam = SamReference(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)
    return _randomise(sam, seed=seed + 1)


def _records(images, long_side: int):
    """segment-anything's batched input: two images, one with points + a box, one with a box and
    a mask; prompts mapped into the resized frame by segment-anything's own transform."""
    transform = ResizeLongestSide(long_side)
    generator = torch.Generator().manual_seed(5)
    records = []
    for image in images:
        size = image.shape[:2]
        box = np.array([[0.1 * size[1], 0.2 * size[0], 0.7 * size[1], 0.9 * size[0]]])
        records.append({
            "image": torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).contiguous(),
            "original_size": size,
            "boxes": torch.as_tensor(transform.apply_boxes(box, size), dtype=torch.float32),
        })
    height, width = images[0].shape[:2]
    points = np.array([[[0.3 * width, 0.6 * height], [0.8 * width, 0.2 * height]]])
    records[0]["point_coords"] = torch.as_tensor(
        transform.apply_coords(points, (height, width)), dtype=torch.float32
    )
    records[0]["point_labels"] = torch.tensor([[1, 0]])
    records[1]["mask_inputs"] = torch.randn(1, 1, 32, 32, generator=generator)
    return records


def test_whole_sam_matches_segment_anything(tmp_path):
    reference = _reference_sam()
    path = tmp_path / "sam_small.pth"
    torch.save(reference.state_dict(), path)
    sam = load_sam(path, decoder_config=DECODER)
    assert sam.image_encoder.blocks[0].window_size == 3 and sam.image_encoder.img_size == 64
    assert read_sam_encoder_config(path) == SamEncoderConfig()  # from the shapes alone
    no_mask = no_mask_prompt_encoder(sam.prompt_encoder)  # LISA's two pieces, SAM's weights
    torch.testing.assert_close(no_mask(1, (8, 8)), reference.prompt_encoder(None, None, None)[1])

    rng = np.random.default_rng(0)
    # Non-square, both shrunk (PIL antialiasing) and enlarged, so resizing, padding and the
    # crop in postprocess_masks all matter.
    images = [rng.integers(0, 256, (100, 77, 3), dtype=np.uint8),
              rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)]
    records = _records(images, long_side=64)
    with torch.no_grad():
        want = reference(records, multimask_output=True)
        got = sam(records, multimask_output=True)
    for w, g in zip(want, got):
        torch.testing.assert_close(g["low_res_logits"], w["low_res_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["iou_predictions"], w["iou_predictions"], atol=1e-4, rtol=0)
        assert g["masks"].shape == w["masks"].shape and torch.equal(g["masks"], w["masks"])
    assert want[0]["masks"].shape == (1, 3, 100, 77)

    # Step by step from the raw uint8 image, with our own transforms.
    image, size = images[0], images[0].shape[:2]
    pixels, input_size = sam.preprocess(image)
    assert pixels.shape == (3, 64, 64) and input_size == (64, 49)
    torch.testing.assert_close(pixels, reference.preprocess(records[0]["image"]), atol=0, rtol=0)
    coords = apply_coords(torch.tensor([[[0.3 * 77, 0.6 * 100], [0.8 * 77, 0.2 * 100]]]), size, 64)
    boxes = apply_boxes(torch.tensor([[0.1 * 77, 0.2 * 100, 0.7 * 77, 0.9 * 100]]), size, 64)
    torch.testing.assert_close(coords, records[0]["point_coords"])
    torch.testing.assert_close(boxes, records[0]["boxes"])
    with torch.no_grad():
        embedding = sam.image_encoder(pixels[None])  # (1, 64, 8, 8)
        sparse, dense = sam.prompt_encoder(points=(coords, torch.tensor([[1, 0]])), boxes=boxes,
                                           masks=None)
        low_res, iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse,
                                        dense, multimask_output=True)
        masks = sam.postprocess_masks(low_res, input_size, size)
        want_masks = reference.postprocess_masks(want[0]["low_res_logits"], (64, 49), size)
    torch.testing.assert_close(masks, want_masks, atol=1e-4, rtol=0)
    assert torch.equal(masks > sam.mask_threshold, want[0]["masks"])
    torch.testing.assert_close(iou, want[0]["iou_predictions"], atol=1e-4, rtol=0)


def test_resize_matches_segment_anything():
    rng = np.random.default_rng(1)
    for shape in [(100, 77, 3), (37, 500, 3), (30, 45, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        want = torch.as_tensor(ResizeLongestSide(128).apply_image(image)).permute(2, 0, 1)
        assert torch.equal(resize_longest_side(image, 128), want), shape
    with pytest.raises(ValueError, match="expected a uint8 \\(H, W, 3\\) RGB image"):
        resize_longest_side(np.zeros((8, 8), dtype=np.uint8), 128)


def test_prompt_encoder_matches_segment_anything():
    kwargs = dict(embed_dim=32, image_embedding_size=(4, 6), input_image_size=(64, 96),
                  mask_in_chans=8)
    torch.manual_seed(0)
    reference = _randomise(SamPromptEncoder(**kwargs), seed=3)
    encoder = PromptEncoder(**kwargs).eval()
    encoder.load_state_dict(reference.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(4)
    coords = torch.rand(2, 3, 2, generator=generator) * torch.tensor([96.0, 64.0])
    points = (coords, torch.tensor([[1, 0, -1], [0, 1, 1]]))
    boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [0.0, 0.0, 95.0, 63.0]])
    masks = torch.randn(2, 1, 16, 24, generator=generator)
    for prompts in [(points, None, None), (None, boxes, None), (points, boxes, masks),
                    (None, None, masks), (None, None, None)]:
        with torch.no_grad():
            want_sparse, want_dense = reference(*prompts)
            sparse, dense = encoder(*prompts)
        assert sparse.shape == want_sparse.shape and dense.shape == want_dense.shape
        torch.testing.assert_close(sparse, want_sparse, atol=1e-6, rtol=0)
        torch.testing.assert_close(dense, want_dense, atol=1e-6, rtol=0)
    assert encoder(points, None, None)[0].shape == (2, 4, 32)  # a padding point without a box
    torch.testing.assert_close(encoder.get_dense_pe(), reference.get_dense_pe(), atol=1e-6, rtol=0)


def test_load_sam_errors_name_the_file_and_key(tmp_path):
    state = _reference_sam().state_dict()
    path = tmp_path / "sam_small.pth"
    cases = [
        ({k: v for k, v in state.items() if k != "image_encoder.blocks.1.norm2.bias"},
         r"sam_small.pth: missing key 'image_encoder.blocks.1.norm2.bias' "
         r"\(expected shape \(32,\)\)"),
        ({k: v for k, v in state.items() if k != "prompt_encoder.point_embeddings.3.weight"},
         r"missing key 'prompt_encoder.point_embeddings.3.weight'"),
        (dict(state, **{"mask_decoder.extra.weight": torch.zeros(1)}),
         r"sam_small.pth: unexpected key 'mask_decoder.extra.weight'"),
        (dict(state, **{"image_encoder.blocks.1.mlp.lin2.weight": torch.zeros(32, 64)}),
         r"'image_encoder.blocks.1.mlp.lin2.weight' has shape \(32, 64\), expected \(32, 128\)"),
        (dict(state, **{"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(6, 16)}),
         r"'image_encoder.blocks.0.attn.rel_pos_h' has 6 rows; expected 2 \* grid - 1 = 15"),
        ({"model.weight": torch.zeros(1)}, r"sam_small.pth: no 'image_encoder.\*' keys"),
        (torch.zeros(3), r"sam_small.pth: expected a state_dict \(dict of tensors\), found Tensor"),
    ]
    for content, message in cases:
        torch.save(content, path)
        with pytest.raises(ValueError, match=message) as raised:
            load_sam(path, decoder_config=DECODER)
        assert "\n" not in str(raised.value)
    path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="sam_small.pth: not a PyTorch state_dict") as raised:
        load_sam(path, decoder_config=DECODER)
    assert "\n" not in str(raised.value)
    # The released decoder does not fit this small checkpoint: the width mismatch is named, and
    # with the width right a mismatched decoder shape.
    torch.save(state, path)
    with pytest.raises(ValueError, match="sam_small.pth: the encoder's neck has 64 output"):
        load_sam(path)
    with pytest.raises(ValueError, match=r"'mask_decoder.transformer.layers.0.mlp.lin1.weight' "
                                         r"has shape \(128, 64\), expected \(96, 64\)"):
        load_sam(path, decoder_config=MaskDecoderConfig(mlp_dim=96))
