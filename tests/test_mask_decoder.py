"""Our MaskDecoder / TwoWayTransformer / prompt pieces against segment-anything's, same weights."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder as SamMaskDecoder
from segment_anything.modeling import PromptEncoder as SamPromptEncoder
from segment_anything.modeling import TwoWayTransformer as SamTwoWayTransformer

from minivlm.models.mask_decoder import (
    MASK_DECODER_PRESETS,
    MaskDecoderConfig,
    build_mask_decoder,
    load_sam_mask_decoder,
)
from minivlm.models.prompt_encoder import PositionEmbeddingRandom

TINY = MaskDecoderConfig(
    transformer_dim=32, depth=2, num_heads=4, mlp_dim=64, iou_head_hidden_dim=32
)
GRID = (4, 4)  # image-embedding grid; masks come out at 4x: 16 x 16


def _sam_modules(config: MaskDecoderConfig, seed: int = 0):
    """segment-anything's decoder and prompt encoder, every tensor randomised.

    Default init leaves LayerNorm weights at 1 and biases at 0, which would hide a swapped
    weight/bias; noise on every tensor makes each name matter.
    """
    torch.manual_seed(seed)
    decoder = SamMaskDecoder(
        transformer_dim=config.transformer_dim,
        transformer=SamTwoWayTransformer(
            depth=config.depth,
            embedding_dim=config.transformer_dim,
            mlp_dim=config.mlp_dim,
            num_heads=config.num_heads,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    prompt_encoder = SamPromptEncoder(
        embed_dim=config.transformer_dim,
        image_embedding_size=GRID,
        input_image_size=(16 * GRID[0], 16 * GRID[1]),
        mask_in_chans=16,
    )
    with torch.no_grad():
        for tensor in [*decoder.state_dict().values(), *prompt_encoder.state_dict().values()]:
            tensor.add_(0.2 * torch.randn_like(tensor))
    return decoder.eval(), prompt_encoder.eval()


def _inputs(config: MaskDecoderConfig, num_prompts: int = 2, num_tokens: int = 3):
    generator = torch.Generator().manual_seed(1)
    image_embeddings = torch.randn(1, config.transformer_dim, *GRID, generator=generator)
    sparse = torch.randn(num_prompts, num_tokens, config.transformer_dim, generator=generator)
    return image_embeddings, sparse


@pytest.mark.parametrize("multimask_output", [True, False])
def test_decoder_matches_segment_anything(multimask_output):
    sam_decoder, sam_prompt = _sam_modules(TINY)
    decoder, _ = build_mask_decoder(TINY)
    decoder.load_state_dict(sam_decoder.state_dict(), strict=True)
    image_embeddings, sparse = _inputs(TINY)
    image_pe = sam_prompt.get_dense_pe()  # (1, C, 4, 4)
    dense = torch.randn(2, TINY.transformer_dim, *GRID)  # a mask prompt's embedding, per prompt
    with torch.no_grad():
        want_masks, want_iou = sam_decoder(
            image_embeddings, image_pe, sparse, dense, multimask_output
        )
        masks, iou = decoder(image_embeddings, image_pe, sparse, dense, multimask_output)
    assert want_masks.shape == (2, 3 if multimask_output else 1, 16, 16)
    torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)


def test_one_image_per_prompt_equals_separate_calls():
    # SAM shares one image across prompts; batched LISA training gives each prompt its own image.
    decoder, prompt_encoder = build_mask_decoder(TINY)
    images = torch.randn(2, TINY.transformer_dim, *GRID)
    sparse = torch.randn(2, 1, TINY.transformer_dim)
    image_pe = prompt_encoder.get_dense_pe(GRID)
    with torch.no_grad():
        batched, batched_iou = decoder(images, image_pe, sparse, prompt_encoder(2, GRID), False)
        for i in range(2):
            single, single_iou = decoder(
                images[i : i + 1], image_pe, sparse[i : i + 1], prompt_encoder(1, GRID), False
            )
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)
            torch.testing.assert_close(batched_iou[i : i + 1], single_iou, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_embeddings has batch 2"):
        three_prompts = torch.randn(3, 1, TINY.transformer_dim)
        decoder(images, image_pe, three_prompts, prompt_encoder(3, GRID), False)


def test_position_embedding_and_no_mask_match_segment_anything():
    _, sam_prompt = _sam_modules(TINY)
    pe = PositionEmbeddingRandom(TINY.transformer_dim // 2)
    pe.load_state_dict(sam_prompt.pe_layer.state_dict(), strict=True)
    torch.testing.assert_close(pe((5, 7)), sam_prompt.pe_layer((5, 7)), atol=1e-6, rtol=0)

    _, prompt_encoder = build_mask_decoder(TINY)
    used = ("pe_layer.", "no_mask_embed.")  # the two SAM prompt pieces LISA keeps
    prompt_encoder.load_state_dict(
        {k: v for k, v in sam_prompt.state_dict().items() if k.startswith(used)}, strict=True
    )
    sam_sparse, sam_dense = sam_prompt(points=None, boxes=None, masks=None)
    assert sam_sparse.shape[1] == 0  # no points/boxes: LISA's [SEG] embedding is the only prompt
    torch.testing.assert_close(prompt_encoder(1, GRID), sam_dense, atol=0, rtol=0)
    torch.testing.assert_close(
        prompt_encoder.get_dense_pe(GRID), sam_prompt.get_dense_pe(), atol=1e-6, rtol=0
    )


def test_sam_preset_has_segment_anythings_shapes():
    # segment_anything/build_sam.py: prompt_embed_dim=256, TwoWayTransformer(2, 256, 2048, 8),
    # a 64x64 grid.
    sam_decoder = SamMaskDecoder(
        transformer_dim=256,
        transformer=SamTwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    sam_prompt = SamPromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(1024, 1024),
        mask_in_chans=16,
    )
    decoder, prompt_encoder = build_mask_decoder(MASK_DECODER_PRESETS["sam"])
    shapes = lambda module: {k: tuple(v.shape) for k, v in module.state_dict().items()}  # noqa: E731
    assert shapes(decoder) == shapes(sam_decoder)
    sam_prompt_shapes = shapes(sam_prompt)
    assert {k: sam_prompt_shapes[k] for k in shapes(prompt_encoder)} == shapes(prompt_encoder)


def _fake_sam_checkpoint(path, config: MaskDecoderConfig):
    """A Sam-like state_dict: mask_decoder.*, prompt_encoder.* and an image-encoder key we skip."""
    sam_decoder, sam_prompt = _sam_modules(config, seed=3)
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(4, 3, 2, 2)}
    state.update({f"mask_decoder.{k}": v for k, v in sam_decoder.state_dict().items()})
    state.update({f"prompt_encoder.{k}": v for k, v in sam_prompt.state_dict().items()})
    torch.save(state, path)
    return state, sam_decoder, sam_prompt


def test_load_sam_checkpoint_matches_segment_anything(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    _, sam_decoder, sam_prompt = _fake_sam_checkpoint(path, TINY)
    decoder, prompt_encoder = load_sam_mask_decoder(path, config=TINY)
    image_embeddings, sparse = _inputs(TINY, num_prompts=1, num_tokens=1)
    with torch.no_grad():
        _, sam_dense = sam_prompt(points=None, boxes=None, masks=None)
        want_masks, want_iou = sam_decoder(
            image_embeddings, sam_prompt.get_dense_pe(), sparse, sam_dense, False
        )
        image_pe, dense = prompt_encoder.get_dense_pe(GRID), prompt_encoder(1, GRID)
        masks, iou = decoder(image_embeddings, image_pe, sparse, dense, False)
    torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)


def test_load_sam_checkpoint_errors_name_the_key(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    state, _, _ = _fake_sam_checkpoint(path, TINY)
    key = "mask_decoder.transformer.layers.1.mlp.lin1.weight"  # (mlp_dim, dim) = (64, 32)

    bad = dict(state, **{key: torch.zeros(63, 32)})
    torch.save(bad, path)
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(63, 32\), expected \(64, 32\)"):
        load_sam_mask_decoder(path, config=TINY)

    missing = {k: v for k, v in state.items() if k != "prompt_encoder.no_mask_embed.weight"}
    torch.save(missing, path)
    message = r"missing key 'prompt_encoder.no_mask_embed.weight' \(expected shape \(1, 32\)\)"
    with pytest.raises(ValueError, match=message):
        load_sam_mask_decoder(path, config=TINY)

    # A checkpoint with a deeper transformer than the config: a leftover decoder key is an error.
    extra = dict(state, **{"mask_decoder.transformer.layers.2.norm1.weight": torch.ones(32)})
    torch.save(extra, path)
    leftover = "mask_decoder.transformer.layers.2.norm1.weight"
    with pytest.raises(ValueError, match=f"unexpected key '{leftover}'"):
        load_sam_mask_decoder(path, config=TINY)

    torch.save({"model.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no 'mask_decoder.\\*' keys"):
        load_sam_mask_decoder(path, config=TINY)
