"""Sequence packing (--pack) and bidirectional image attention (--image-attention): a packed
batch computes exactly what the padded batch does, sample by sample; image tokens that see
each other change only what they should, and KV-cache decoding still matches a full recompute."""
import copy
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention.flex_attention import BlockMask

import train_pretrain
from conftest import tiny_vlm_config
from minivlm.constants import IGNORE_INDEX
from minivlm.data.batch import ChatDataset, collate
from minivlm.data.images import ImageProcessor
from minivlm.data.packing import collate_packed, first_fit_decreasing
from minivlm.data.sample import Sample
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.load import load_vlm
from minivlm.models.attention_mask import (DocumentSpans, ImageTokensConfig, document_mask,
                                           image_blocks, is_ready_mask)
from minivlm.models.build import build_vlm
from minivlm.models.vlm import VLMConfig
from minivlm.train.batch_plan import BatchPlan
from minivlm.train.distributed import init_distributed
from minivlm.train.results import RESULTS_FILE
from minivlm.train.stage import parse_args
from minivlm.train.trainer import Trainer


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def make_model(tokenizer, attention: str, seg: bool = True, max_tiles: int = 4):
    torch.manual_seed(0)
    config = replace(tiny_vlm_config(seg=seg), image_tokens=ImageTokensConfig(attention))
    config.vision.max_tiles = max_tiles
    return build_vlm(config, tokenizer)


def square_mask(height, width, top, left):
    mask = np.zeros((height, width), np.uint8)
    mask[top:top + 8, left:left + 8] = 1
    return mask


def samples(tmp_path):
    """Five conversations: a tiled image plus a second image with a [SEG], text only, two
    images, two [SEG]s, one image: every way a sample can carry images and masks."""
    rng = np.random.default_rng(0)  # noise: every tile differs, so a wrong tile shows
    wide, square, other = tmp_path / "wide.png", tmp_path / "square.png", tmp_path / "other.png"
    for path, size in ((wide, (32, 128)), (square, (32, 32)), (other, (32, 32))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)

    def chat(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [
        Sample(images=[wide, square], masks=[square_mask(32, 128, 4, 20)], source="p:0",
               turns=chat("<image>\nleft <image>\nsegment the red one", "Sure, [SEG].")),
        Sample(images=[], source="p:1", turns=chat("what is a square?", "a shape with four sides")),
        Sample(images=[other, square], source="p:2", turns=chat("<image>\n<image>\nsame?", "no")),
        Sample(images=[other], masks=[square_mask(32, 32, 2, 2), square_mask(32, 32, 20, 12)],
               source="p:3", turns=chat("<image>\nsegment both", "here [SEG] and [SEG].")),
        Sample(images=[square], source="p:4", turns=chat("<image>\ncolour?", "green")),
    ]


def token_losses(model, batch):
    """(B, T-1) cross-entropy of every labelled next token (0 elsewhere), through the same mask
    and positions VLM.forward uses."""
    embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"])
    mask, positions = model.lm_mask(batch["input_ids"], batch["attention_mask"],
                                    batch.get("document_ids"))
    hidden = model.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                    position_ids=positions)
    logits = model.lm.lm_head(hidden[:, :-1]).float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                           ignore_index=IGNORE_INDEX)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_batch_equals_padded_batch_per_sample_with_images_and_masks(tokenizer, tmp_path,
                                                                          attention):
    model = make_model(tokenizer, attention)
    dataset = ChatDataset(samples(tmp_path), tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, 512)
    items = [dataset[i] for i in range(len(dataset))]
    # As if a dataset labelled its first token: still never learned across a sample boundary.
    items[1]["labels"][0] = items[1]["input_ids"][0]
    # Example 1 follows another sample; the [SEG] samples 0 and 3 are not their row's first, so
    # a mask predicted on its row's first sample's tile instead of its own shows.
    rows = [(4, 0), (3, 1, 2)]
    padded = collate(items, tokenizer.pad_id)
    packed = collate_packed([[items[i] for i in row] for row in rows], tokenizer.pad_id)
    # Per sample: the sum of its token losses, from its row (padded) or its document (packed).
    per_padded = token_losses(model, padded).sum(1)
    per_packed = token_losses(model, packed)
    targets_doc = packed["document_ids"][:, 1:]
    order = [i for row in rows for i in row]  # document d + 1 is example order[d]
    for d, i in enumerate(order):
        torch.testing.assert_close(per_packed[targets_doc == d + 1].sum(), per_padded[i],
                                   atol=1e-5, rtol=1e-5)
    # Every packed sample's first token is never predicted from the sample before it.
    assert (per_packed[targets_doc != packed["document_ids"][:, :-1]] == 0).all()
    out_padded, grads_padded = loss_and_grads(model, padded)
    out_packed, grads_packed = loss_and_grads(model, packed)
    assert out_packed.mask_bce is not None and out_packed.num_label_tokens > 0
    for name in ("loss", "ce_loss", "mask_bce", "mask_dice", "num_label_tokens"):
        torch.testing.assert_close(getattr(out_packed, name), getattr(out_padded, name),
                                   atol=1e-5, rtol=1e-5, msg=name)
    assert grads_packed.keys() == grads_padded.keys()
    assert any(n.startswith("seg_head") for n in grads_packed)  # the masks did train the head
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def dense_mask(model, batch):
    """The rule itself as one dense (B, 1, T, T) mask: what every other layout must compute."""
    ids = batch["input_ids"]
    document_ids = batch.get("document_ids")
    if document_ids is None:
        document_ids = batch["attention_mask"].long()
    bidirectional = model.config.image_tokens.attention == "bidirectional"
    blocks = (image_blocks(ids == model.config.image_token_id, document_ids) if bidirectional
              else None)
    return document_mask(document_ids, blocks)


ROWS = [(4, 0), (3, 1, 2)]  # the packed rows of samples(): two rows of unequal length


def packed_items(tokenizer, model, tmp_path):
    """(packed batch, padded batch, items) of samples()."""
    dataset = ChatDataset(samples(tmp_path), tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, 512)
    items = [dataset[i] for i in range(len(dataset))]
    packed = collate_packed([[items[i] for i in row] for row in ROWS], tokenizer.pad_id)
    return packed, collate(items, tokenizer.pad_id), items


def hidden_and_grads(model, embeds, mask, positions):
    """Final hidden states, and the gradients of a fixed random projection of them (so every
    position and feature counts) with respect to the input embeddings and the LM's weights."""
    model.zero_grad()
    embeds = embeds.detach().requires_grad_()
    hidden = model.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                    position_ids=positions)
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    (hidden * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.lm.named_parameters() if p.grad is not None}
    return hidden.detach(), {"inputs_embeds": embeds.grad, **grads}


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_pack_document_spans_give_the_dense_masks_hidden_states_and_gradients(tokenizer, tmp_path,
                                                                              attention):
    """Packed rows on the CPU attend one sample at a time (DocumentSpans); the same numbers as
    the dense mask over the whole row, forward and backward, with tiled and multiple images."""
    model = make_model(tokenizer, attention)
    packed, _, items = packed_items(tokenizer, model, tmp_path)
    embeds, _ = model.embed(packed["input_ids"], packed["pixel_values"])
    spans, positions = model.lm_mask(packed["input_ids"], packed["attention_mask"],
                                     packed["document_ids"])
    assert isinstance(spans, DocumentSpans)
    # One span per sample in packed order, then the row's padding tail (its own block: a padding
    # query sees only itself). Causal: every sample takes SDPA's fused causal kernel (mask None);
    # bidirectional: a sample with an image carries its block of the dense mask.
    T = packed["input_ids"].shape[1]
    for b, row in enumerate(ROWS):
        lengths = [len(items[i]["input_ids"]) for i in row]
        tail = [T - sum(lengths)] if sum(lengths) < T else []
        assert spans.lengths[b] == lengths + tail
        fused = [attention == "causal" or not items[i]["pixel_values"] for i in row]
        assert [mask is None for mask in spans.masks[b]] == fused + [False] * len(tail)
    assert sum(map(len, spans.lengths)) == 6  # one row is padded
    got_hidden, got_grads = hidden_and_grads(model, embeds, spans, positions)
    want_hidden, want_grads = hidden_and_grads(model, embeds, dense_mask(model, packed), positions)
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_pack_document_spans_that_break_the_rule_change_what_the_next_sample_sees(tokenizer,
                                                                                 tmp_path):
    """The comparison above can fail: a span that joins two samples under plain causal attention
    lets the second see the first; the first, which sees only itself either way, is unchanged."""
    model = make_model(tokenizer, "causal").eval()
    packed, _, _ = packed_items(tokenizer, model, tmp_path)
    embeds, _ = model.embed(packed["input_ids"], packed["pixel_values"])
    spans, positions = model.lm_mask(packed["input_ids"], packed["attention_mask"],
                                     packed["document_ids"])
    first, second, *rest = spans.lengths[1]
    joined = DocumentSpans([spans.lengths[0], [first + second, *rest]],
                           [spans.masks[0], [None, *spans.masks[1][2:]]])
    right = model.lm.hidden_states(inputs_embeds=embeds, attention_mask=spans,
                                   position_ids=positions)
    wrong = model.lm.hidden_states(inputs_embeds=embeds, attention_mask=joined,
                                   position_ids=positions)
    torch.testing.assert_close(wrong[1, :first], right[1, :first])
    assert (wrong[1, first:first + second] - right[1, first:first + second]).abs().amax() > 1e-3
    torch.testing.assert_close(wrong[0], right[0])


@torch.no_grad()
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_pack_flex_attention_block_mask_gives_the_dense_masks_hidden_states(tokenizer, tmp_path,
                                                                           attention):
    """CUDA training attends through FlexAttention's BlockMask (use_flex_attention); its forward
    also runs on CPU (eager), so its rule is checked here against the dense SDPA mask, packed and
    padded, with tiled, multiple and bidirectional images."""
    model = make_model(tokenizer, attention).eval()
    packed, padded, _ = packed_items(tokenizer, model, tmp_path)
    for batch in (packed, padded):
        embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"])
        mask, positions = model.lm_mask(batch["input_ids"], batch["attention_mask"],
                                        batch.get("document_ids"), flex=True)
        if not is_ready_mask(mask):  # padded and causal: the padding mask itself
            assert batch is padded and attention == "causal"
            continue
        assert isinstance(mask, BlockMask)
        flex = model.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                      position_ids=positions)
        dense = model.lm.hidden_states(inputs_embeds=embeds, position_ids=positions,
                                       attention_mask=dense_mask(model, batch))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_packed_batch_orders_images_masks_and_seg_tiles_in_packed_order(tokenizer, tmp_path):
    model = make_model(tokenizer, "causal")
    dataset = ChatDataset(samples(tmp_path), tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, 512)
    items = [dataset[i] for i in range(len(dataset))]
    rows = [(4, 0), (3, 1, 2)]
    packed = collate_packed([[items[i] for i in row] for row in rows], tokenizer.pad_id)
    # tiles: p:4 square (0), p:0 wide 5 + square (1..6), p:3 square (7), p:2 two squares (8, 9)
    assert packed["pixel_values"].shape[0] == 10
    assert packed["seg_tile_index"].tolist() == [0, 5, 7, 8, 8]  # p:1 has no image: 8 unused
    assert [m.shape for m in packed["masks"]] == [(32, 128), (32, 32), (32, 32)]
    assert packed["document_ids"][0, 0] == 1 and packed["document_ids"][1, 0] == 3
    assert packed["attention_mask"].sum() == sum(dataset.lengths())
    # RoPE positions restart at every sample (and would not matter to relative attention alone,
    # so they are checked here, not through the losses).
    _, positions = model.lm_mask(packed["input_ids"], packed["attention_mask"],
                                 packed["document_ids"])
    lengths = dataset.lengths()
    for b, row in enumerate(rows):
        expected = torch.cat([torch.arange(lengths[i]) for i in row])
        assert positions[b, :len(expected)].tolist() == expected.tolist()


def test_first_fit_decreasing_packs_longest_first_into_the_first_bin_with_room():
    assert first_fit_decreasing([5, 3, 7, 2, 4, 6], 10) == [(2, 1), (5, 4), (0, 3)]
    rng = random.Random(0)
    lengths = [min(500, int(rng.lognormvariate(4, 1)) + 1) for _ in range(400)]
    bins = first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 512
    # The reference: a plain loop over bins for each example, longest first.
    reference, room = [], []
    for i in sorted(range(400), key=lambda i: -lengths[i]):
        b = next((b for b, left in enumerate(room) if left >= lengths[i]), len(room))
        if b == len(room):
            reference.append([])
            room.append(512)
        reference[b].append(i)
        room[b] -= lengths[i]
    assert bins == [tuple(b) for b in reference]
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 512) + 1  # Johnson's bound on FFD


def test_pack_example_longer_than_max_seq_len_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^d.json:7: 700 tokens do not fit one packed row of "
                                         r"max_seq_len=512 \(--pack\)$"):
        BatchPlan([100] * 7 + [700], 2, init_distributed(False), seed=0, group_by_length=False,
                  pack_len=512, names=[f"d.json:{i}" for i in range(8)])


def test_pack_batch_plan_deals_rows_and_resumes_exactly():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    plan = BatchPlan(lengths, 4, init_distributed(False), seed=0, group_by_length=False,
                     pack_len=256)
    epoch = plan.epoch_batches(0)
    assert all(len(batch) == 4 and all(sum(lengths[i] for i in row) <= 256 for row in batch)
               for batch in epoch)
    dealt = sorted(i for batch in epoch for row in batch for i in row)
    assert len(dealt) == len(set(dealt)) and len(dealt) > 0.9 * 300  # < one batch left over
    assert sum(lengths) / (256 * len(plan.units)) > 0.95  # rows are nearly full
    resumed = plan.from_micro_step(plan.per_epoch + 2)
    assert next(resumed) == plan.epoch_batches(1)[2]


def test_pack_and_image_attention_flags_and_old_configs_load(tokenizer):
    args = parse_args("t", ["--pack", "--image-attention", "bidirectional"])
    assert args.train_config.pack and args.image_attention == "bidirectional"
    assert not parse_args("t", []).train_config.pack
    with pytest.raises(ValueError, match="--image-attention .* causal, bidirectional, got 'x'"):
        parse_args("t", ["--image-attention", "x"])
    config = make_model(tokenizer, "bidirectional", seg=False).config.to_dict()
    assert VLMConfig.from_dict(config).image_tokens.attention == "bidirectional"
    del config["image_tokens"]  # a config.json saved before the option existed
    assert VLMConfig.from_dict(config).image_tokens == ImageTokensConfig("causal")


def image_batch(tokenizer, model, tmp_path, left_pad=False):
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "b.png")
    chats = [Sample(images=[tmp_path / "b.png"], source=f"g:{k}", turns=[
        {"role": "user", "content": question + " <image>\nwhat colour?"},
        {"role": "assistant", "content": "blue"}]) for k, question in enumerate(["look", "hi"])]
    dataset = ChatDataset(chats, tokenizer, ImageProcessor.for_tower(model.vision),
                          model.image_tokens_per_tile, 512)
    return collate([dataset[0], dataset[1]], tokenizer.pad_id, left_pad=left_pad)


def hidden_with_embeds(model, batch, embeds):
    mask, positions = model.lm_mask(batch["input_ids"], batch["attention_mask"])
    return model.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=positions)


@torch.no_grad()
def test_pack_bidirectional_image_tokens_see_their_own_image_only(tokenizer, tmp_path):
    bidirectional = make_model(tokenizer, "bidirectional", seg=False).eval()
    causal = copy.deepcopy(bidirectional)
    causal.config = replace(causal.config, image_tokens=ImageTokensConfig("causal"))
    batch = image_batch(tokenizer, bidirectional, tmp_path)
    image = (batch["input_ids"][0] == tokenizer.image_token_id).nonzero().flatten()
    first, last = int(image[0]), int(image[-1])
    assert last - first + 1 == bidirectional.image_tokens_per_tile > 1
    embeds, _ = bidirectional.embed(batch["input_ids"], batch["pixel_values"])
    changed = embeds.clone()
    changed[0, last] += 1.0  # the image's last token
    for model, sees_later in ((bidirectional, True), (causal, False)):
        before = hidden_with_embeds(model, batch, embeds)
        after = hidden_with_embeds(model, batch, changed)
        moved = (after - before).abs().amax(-1)[0]  # (T,)
        assert bool(moved[first] > 1e-4) == sees_later  # the first image token sees the last
        assert moved[:first].max() == 0  # text before the image never sees it
        assert moved[last + 1:int(batch["attention_mask"][0].sum())].min() > 0  # text after does
    # The other row is its own sample: untouched either way.
    torch.testing.assert_close(hidden_with_embeds(bidirectional, batch, changed)[1],
                               hidden_with_embeds(bidirectional, batch, embeds)[1])


def test_pack_adjacent_image_placeholders_are_refused_naming_the_record(tokenizer, tmp_path):
    """Two images with nothing between them would be one run of image rows: one block."""
    model = make_model(tokenizer, "bidirectional", seg=False)
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "b.png")
    chat = [Sample(images=[tmp_path / "b.png"] * 2, source="pairs.json:3", turns=[
        {"role": "user", "content": "<image><image>\nsame?"},
        {"role": "assistant", "content": "yes"}])]
    with pytest.raises(ValueError, match=r"^pairs.json:3: two <image> placeholders with nothing "
                                         "between them"):
        ChatDataset(chat, tokenizer, ImageProcessor.for_tower(model.vision),
                    model.image_tokens_per_tile, 512)


@torch.no_grad()
def test_pack_bidirectional_kv_cache_generation_equals_full_recompute(tokenizer, tmp_path):
    model = make_model(tokenizer, "bidirectional", seg=False).eval()
    batch = image_batch(tokenizer, model, tmp_path, left_pad=True)
    ids, attention, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert not bool(attention.all())  # row 1 is left-padded
    cached = model.generate(ids, attention, pixels, max_new_tokens=6)
    recomputed = []
    for _ in range(6):  # no cache: the whole sequence, the image bidirectional, every step
        embeds, _ = model.embed(ids, pixels)
        mask, positions = model.lm_mask(ids, attention)
        assert mask.dim() == 4
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        token = logits[:, -1].argmax(-1)  # (B,)
        recomputed.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        attention = torch.cat([attention, attention.new_ones(2, 1)], 1)
    assert cached.tolist() == torch.stack(recomputed, 1).tolist()


def test_pack_flag_trains_a_stage_end_to_end(shapes_dir, tiny_tokenizer_dir, tmp_path,
                                             monkeypatch):
    trainers, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: trainers.append(self) or fit(self))
    results = train_pretrain.main([
        "--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
        "--out-dir", str(tmp_path / "run"), "--max-steps", "2", "--model-preset", "demo-quick",
        "--batch-size", "2", "--log-every", "1", "--pack", "--image-attention", "bidirectional"])
    assert np.isfinite(results["train/loss"])
    # 2 steps of 2 rows: padded, 4 examples at most; packed rows of several examples hold more.
    longest = max(trainers[0].train_set.lengths())
    tokens = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())["tokens"]
    assert tokens > 2 * 2 * longest
    model, _, _ = load_vlm(tmp_path / "run")
    assert model.config.image_tokens.attention == "bidirectional"
