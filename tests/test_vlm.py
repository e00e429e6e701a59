"""The VLM: image-token splicing by value, overfitting one batch, masks, tiling, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vlm_config
from minivlm.models.build import build_vlm
from minivlm.data.batch import ChatDataset, collate, expand_image_tokens
from minivlm.data.feature_cache import FeatureCache
from minivlm.data.images import (ImageProcessor, choose_grid, dynamic_tiles, load_image,
                                 num_tiles)
from minivlm.data.sample import Sample
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.train.activation_checkpointing import enable_activation_checkpointing


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def make_image(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return path


def test_splice_puts_each_image_at_its_placeholder_with_mixed_tile_counts(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = tiny_vlm_config(seg=False)
    config.vision.max_tiles = 4
    model = build_vlm(config, tokenizer).eval()
    processor = ImageProcessor.for_tower(model.vision)
    wide = make_image(tmp_path / "wide.png", (128, 32), (200, 10, 10))  # 4x1 grid + thumbnail
    square = make_image(tmp_path / "sq.png", (32, 32), (10, 200, 10))  # one tile
    samples = [
        Sample(images=[wide, square], turns=[
            {"role": "user", "content": "<image>\nleft <image>\nright?"},
            {"role": "assistant", "content": "red"}], source="a:0"),
        Sample(images=[square], turns=[
            {"role": "user", "content": "<image>\nwhat?"},
            {"role": "assistant", "content": "green"}], source="a:1"),
    ]
    dataset = ChatDataset(samples, tokenizer, processor, model.image_tokens_per_tile, 512)
    batch = collate([dataset[0], dataset[1]], tokenizer.pad_id)
    assert batch["pixel_values"].shape[0] == 5 + 1 + 1  # tiles: wide (4 + thumb), square, square
    per_tile = model.image_tokens_per_tile
    with torch.no_grad():
        embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"])
        image_rows = model.projector(model.vision(batch["pixel_values"]))  # (tiles, P', D)
    positions = (batch["input_ids"] == tokenizer.image_token_id).nonzero().tolist()
    assert len(positions) == 7 * per_tile
    # Sample 0 holds tiles 0..5 in order, sample 1 tile 6; text positions keep token embeddings.
    expected = image_rows.reshape(-1, image_rows.shape[-1])
    for k, (b, t) in enumerate(positions):
        torch.testing.assert_close(embeds[b, t], expected[k], rtol=0, atol=0)
    assert sum(1 for b, _ in positions if b == 0) == 6 * per_tile
    text = batch["input_ids"] != tokenizer.image_token_id
    torch.testing.assert_close(embeds[text], model.lm.embed_tokens(batch["input_ids"])[text])
    # Labels never sit on image or prompt tokens.
    assert (batch["labels"][~text] == -100).all()


def test_tiling_grid_and_count():
    assert choose_grid(128, 32, 32, 4) == (4, 1)
    assert choose_grid(64, 64, 32, 4) == (2, 2)
    assert num_tiles(64, 64, 32, 4) == 5 and num_tiles(64, 64, 32, 1) == 1
    tiles = dynamic_tiles(Image.new("RGB", (96, 32)), 32, 6)
    assert len(tiles) == 4 and all(t.size == (32, 32) for t in tiles)


def test_tiny_vlm_overfits_one_batch_with_masks(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(tiny_vlm_config(seg=True), tokenizer)
    processor = ImageProcessor.for_tower(model.vision)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 8:24] = 1
    mask[0, :] = 255  # ignored row
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((250, 0, 0), (8, 4, 24, 20))
    image.save(tmp_path / "red.png")
    samples = [Sample(images=[tmp_path / "red.png"], masks=[mask], source="s:0", turns=[
        {"role": "user", "content": "<image>\nSegment the red square."},
        {"role": "assistant", "content": "Sure, it is [SEG]."}]),
        Sample(images=[tmp_path / "red.png"], source="s:1", turns=[
            {"role": "user", "content": "<image>\nWhat colour is the square?"},
            {"role": "assistant", "content": "### The final answer is: red"}])]
    dataset = ChatDataset(samples, tokenizer, processor, model.image_tokens_per_tile, 512)
    batch = collate([dataset[0], dataset[1]], tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out.ce_loss < 0.1, out.ce_loss
    model.eval()
    logits = model.predict_masks(batch["input_ids"][:1], batch["attention_mask"][:1],
                                 batch["pixel_values"][:1], batch["seg_tile_index"][:1],
                                 [(32, 32)])
    predicted = (logits[0] > 0).numpy()
    valid = mask != 255
    iou = (predicted & (mask == 1))[valid].sum() / (predicted | (mask == 1))[valid].sum()
    assert iou > 0.9, iou


def test_expand_image_tokens_and_count_mismatch():
    ids, labels = expand_image_tokens([1, 9, 2, 9], [-100, -100, 5, -100], 9, [2, 3])
    assert ids == [1, 9, 9, 2, 9, 9, 9] and labels == [-100, -100, -100, 5, -100, -100, -100]
    with pytest.raises(ValueError, match="2 <image> tokens in the text but 3 images"):
        expand_image_tokens([9, 9], [0, 0], 9, [1, 1, 1])


def test_too_long_sequence_names_the_record_and_skip_bad_counts_it(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = tiny_vlm_config(seg=False)
    config.lm.max_seq_len = 40
    model = build_vlm(config, tokenizer)
    processor = ImageProcessor.for_tower(model.vision)
    good = Sample(images=[], source="d.json:0", turns=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}])
    long = Sample(images=[], source="d.json:1", turns=[
        {"role": "user", "content": "red " * 60}, {"role": "assistant", "content": "red"}])
    with pytest.raises(ValueError, match=r"d.json:1: \d+ tokens .* exceed the context of 40"):
        ChatDataset([good, long], tokenizer, processor, model.image_tokens_per_tile, 40)
    dataset = ChatDataset([good, long], tokenizer, processor, model.image_tokens_per_tile, 40,
                          skip_bad=True)
    assert len(dataset) == 1 and len(dataset.errors) == 1 and "d.json:1" in dataset.errors[0]


def test_missing_image_is_one_line_naming_the_record(tokenizer, tmp_path):
    model = build_vlm(tiny_vlm_config(seg=False), tokenizer)
    sample = Sample(images=[tmp_path / "nope.png"], source="d.json:3", turns=[
        {"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "red"}])
    with pytest.raises(ValueError, match="d.json:3: .*nope.png"):
        ChatDataset([sample], tokenizer, ImageProcessor.for_tower(model.vision),
                    model.image_tokens_per_tile, 512)


def test_mask_of_the_wrong_size_names_the_record(tokenizer, tmp_path):
    model = build_vlm(tiny_vlm_config(seg=True), tokenizer)
    make_image(tmp_path / "a.png", (32, 32), (255, 0, 0))
    sample = Sample(images=[tmp_path / "a.png"], masks=[np.zeros((16, 32), np.uint8)],
                    source="seg.json:2", turns=[{"role": "user", "content": "<image>\nfind it"},
                                                {"role": "assistant", "content": "Sure, [SEG]."}])
    with pytest.raises(ValueError, match="seg.json:2: mask 0 is 32x16 but the image is 32x32"):
        ChatDataset([sample], tokenizer, ImageProcessor.for_tower(model.vision),
                    model.image_tokens_per_tile, 512)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(tiny_vlm_config(seg=False), tokenizer)
    make_image(tmp_path / "a.png", (32, 32), (0, 255, 0))
    sample = Sample(images=[tmp_path / "a.png"], source="s:0", turns=[
        {"role": "user", "content": "<image>\ncolour?"}, {"role": "assistant", "content": "green"}])
    batch = collate([ChatDataset([sample], tokenizer, ImageProcessor.for_tower(model.vision),
                                 model.image_tokens_per_tile, 512)[0]], tokenizer.pad_id)
    plain = model(**batch).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert enable_activation_checkpointing(model) == 2  # both LM blocks
    checkpointed = model(**batch).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                   rtol=1e-5, atol=1e-7, msg=name)


def test_cached_tower_features_give_the_same_loss_as_pixels(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(tiny_vlm_config(seg=False), tokenizer).eval()
    model.vision.requires_grad_(False)
    make_image(tmp_path / "a.png", (32, 32), (0, 0, 255))
    samples = [Sample(images=[tmp_path / "a.png"], source="s:0", turns=[
        {"role": "user", "content": "<image>\ncolour?"}, {"role": "assistant", "content": "blue"}])]
    processor = ImageProcessor.for_tower(model.vision)
    plain = ChatDataset(samples, tokenizer, processor, model.image_tokens_per_tile, 512)
    cache = FeatureCache(tmp_path / "cache", "tower",
                         lambda path: model.vision(processor(load_image(path))))
    cached = ChatDataset(samples, tokenizer, processor, model.image_tokens_per_tile, 512,
                         feature_cache=cache)
    batch_plain, batch_cached = (collate([d[0]], tokenizer.pad_id) for d in (plain, cached))
    assert batch_cached["pixel_values"].shape == (1, model.vision.num_patches, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch_cached).loss, model(**batch_plain).loss)
