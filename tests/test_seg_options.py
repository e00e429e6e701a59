"""Segmentation recipe options: the dot-product head and the choice of the prompting state."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vlm_config
from minivlm.data.batch import ChatDataset, collate
from minivlm.data.images import ImageProcessor
from minivlm.data.sample import Sample
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.models.build import build_vlm, build_vlm_from_config
from minivlm.models.dot_mask_head import DotProductMaskHead
from minivlm.models.seg_head import SegConfig, SimilarityPrompt
from minivlm.models.vlm import VLMConfig
from minivlm.train.stage import parse_args


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def seg_config(**fields) -> VLMConfig:
    config = tiny_vlm_config(seg=True)
    return replace(config, seg=replace(config.seg, **fields))


def test_dot_head_pixel_embeddings_unfold_each_patch_into_its_own_block():
    head = DotProductMaskHead(lm_dim=4, vision_dim=3, grid_size=2, dim=2, upscale=2)
    tokens = torch.randn(1, 4, 3)  # a 2x2 patch grid
    projected = head.image_to_mask(tokens).view(1, 4, 2, 2, 2)  # (n, P, C, uy, ux)
    pixels = head.pixel_embeddings(tokens)  # (n, C, 4, 4)
    for patch in range(4):
        py, px = divmod(patch, 2)
        for uy in range(2):
            for ux in range(2):
                torch.testing.assert_close(pixels[0, :, 2 * py + uy, 2 * px + ux],
                                           projected[0, patch, :, uy, ux])


def test_dot_head_logit_is_the_scaled_dot_product_at_every_pixel():
    torch.manual_seed(0)
    head = DotProductMaskHead(lm_dim=4, vision_dim=3, grid_size=2, dim=2, upscale=2)
    seg_hidden, tokens = torch.randn(1, 4), torch.randn(1, 4, 3)
    (logits,) = head(seg_hidden, tokens, [(4, 4)])  # output size = low-res size: no resampling
    query = head.text_hidden_fcs(seg_hidden)[0]
    expected = torch.einsum("c,chw->hw", query, head.pixel_embeddings(tokens)[0]) / 2 ** 0.5
    torch.testing.assert_close(logits, expected)


def test_seg_prompt_picks_the_predicting_state_or_the_seg_token_state(tokenizer):
    seg, (a, b, c) = tokenizer.seg_token_id, tokenizer.encode("red blue green")[:3]
    assert seg not in (a, b, c)
    input_ids = torch.tensor([[a, b, seg, c], [seg, a, b, seg]])
    for prompt, expected in (("predicting", ([0, 1], [1, 2])),
                             ("seg_token", ([0, 1, 1], [2, 0, 3]))):
        model = build_vlm(seg_config(prompt=prompt), tokenizer)
        rows, cols = model.seg_positions(input_ids)
        assert (rows.tolist(), cols.tolist()) == expected, prompt


def test_unknown_head_or_prompt_is_one_clear_error():
    with pytest.raises(ValueError, match="SegConfig.head must be one of sam, dot, got 'unet'"):
        SegConfig(head="unet")
    with pytest.raises(ValueError, match="SegConfig.prompt must be one of predicting, seg_token"):
        SegConfig(prompt="last")
    with pytest.raises(ValueError, match="SegConfig.dense_prompt must be .* got 'mask'"):
        SegConfig(dense_prompt="mask")
    with pytest.raises(ValueError, match="--seg-head dot has no SAM decoder"):
        SegConfig(head="dot", dense_prompt="similarity")


def test_a_bad_choice_on_the_command_line_names_the_flag():
    with pytest.raises(ValueError, match="--seg-head must be one of sam, dot, got 'unet'"):
        parse_args("test", ["--seg-head", "unet"])
    with pytest.raises(ValueError, match="--image-attention must be one of causal, bidirect"):
        parse_args("test", ["--image-attention", "full"])


def _red_square_batch(tokenizer, model, tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 8:24] = 1
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((250, 0, 0), (8, 4, 24, 20))
    image.save(tmp_path / "red.png")
    sample = Sample(images=[tmp_path / "red.png"], masks=[mask], source="s:0", turns=[
        {"role": "user", "content": "<image>\nSegment the red square."},
        {"role": "assistant", "content": "Sure, it is [SEG]."}])
    dataset = ChatDataset([sample], tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, 512)
    return collate([dataset[0]], tokenizer.pad_id), mask


def test_similarity_prompt_is_the_query_image_dot_product_in_both_of_its_outputs():
    torch.manual_seed(0)
    prompt = SimilarityPrompt(dim=4)
    query, image = torch.randn(2, 4), torch.randn(2, 4, 3, 3)
    coarse, dense = prompt(query, image)
    expected = torch.stack([(image[k] * query[k][:, None, None]).sum(0) for k in range(2)]) / 2
    torch.testing.assert_close(coarse[:, 0], expected)
    torch.testing.assert_close(dense, expected[:, None] * prompt.direction[None, :, None, None])


def test_similarity_prompt_changes_the_sam_masks_by_its_upsampled_coarse_map(tokenizer):
    """With the prompt, the decoder sees the dense map and its output is added to the coarse
    one: zeroing the direction leaves exactly LISA's decoder output plus the coarse map."""
    torch.manual_seed(0)
    head = build_vlm(seg_config(dense_prompt="similarity"), tokenizer).seg_head
    plain = build_vlm(seg_config(), tokenizer).seg_head
    plain.load_state_dict({k: v for k, v in head.state_dict().items()
                           if not k.startswith("similarity_prompt.")})
    with torch.no_grad():
        head.similarity_prompt.direction.zero_()
    seg_hidden, tokens = torch.randn(2, 32), torch.randn(2, 16, 32)
    g = head.grid_size
    image = head.image_to_mask(tokens).transpose(1, 2).reshape(2, -1, g, g)
    coarse, _ = head.similarity_prompt(head.text_hidden_fcs(seg_hidden), image)
    size = (4 * g, 4 * g)
    upsampled = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear",
                                                align_corners=False)
    for k, (ours, lisa) in enumerate(zip(head(seg_hidden, tokens, [size] * 2),
                                         plain(seg_hidden, tokens, [size] * 2))):
        torch.testing.assert_close(ours, lisa + upsampled[k, 0])


@pytest.mark.parametrize("head,prompt,dense", [("dot", "seg_token", "none"),
                                               ("sam", "seg_token", "none"),
                                               ("sam", "predicting", "similarity")])
def test_each_head_and_prompt_learns_a_mask_and_survives_a_config_round_trip(
        tokenizer, tmp_path, head, prompt, dense):
    torch.manual_seed(0)
    model = build_vlm(seg_config(head=head, prompt=prompt, dense_prompt=dense), tokenizer)
    batch, mask = _red_square_batch(tokenizer, model, tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
            batch["seg_tile_index"], [(32, 32)])
    logits = model.predict_masks(*args)[0]
    predicted = (logits > 0).numpy()
    iou = (predicted & (mask == 1)).sum() / (predicted | (mask == 1)).sum()
    assert iou > 0.9, iou
    # config.json's dict rebuilds the same head: the weights load and give the same masks
    rebuilt = build_vlm_from_config(VLMConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    torch.testing.assert_close(rebuilt.predict_masks(*args)[0], logits)
