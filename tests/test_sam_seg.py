"""SAM's own image encoder as the seg head's image input (--seg-image-encoder sam, LISA's design):
built from a SAM checkpoint, frozen, fed through the feature cache, its masks in SAM's frame, and
rebuilt from a minivlm checkpoint without the SAM file."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_seg
from conftest import tiny_vlm_config
from minivlm.constants import IGNORE_INDEX
from minivlm.data.batch import ChatDataset, collate
from minivlm.data.feature_cache import FeatureCache
from minivlm.data.images import ImageProcessor
from minivlm.data.readers import read_dataset
from minivlm.data.sample import Sample
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.eval.inference import segment_samples
from minivlm.load import load_vlm
from minivlm.models.build import build_vlm
from minivlm.models.mask_decoder import MASK_DECODER_PRESETS
from minivlm.models.sam import SamConfig, SamEncoderConfig, build_sam
from minivlm.models.sam_transforms import preprocess_shape, sam_preprocess
from minivlm.models.seg_head import SegConfig
from minivlm.models.seg_losses import mask_loss, dice_loss, sigmoid_bce_loss
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.train.trainable import set_trainable

# A tiny SAM: a 64 px encoder (8 x 8 grid) with SAM's real 256-wide decoder.
TINY_ENCODER = SamEncoderConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                window_size=3, global_attn_indexes=(1,), out_chans=256)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_sam(SamConfig(encoder=TINY_ENCODER, decoder=MASK_DECODER_PRESETS["sam"]))
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)  # an original checkpoint's layout: a bare state dict
    return path, sam


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def sam_vlm(tokenizer, sam_path):
    torch.manual_seed(1)
    config = tiny_vlm_config()
    config = replace(config, seg=replace(config.seg, image_encoder="sam",
                                         sam_checkpoint=str(sam_path)))
    return build_vlm(config, tokenizer)


def seg_sample(tmp_path, size=(40, 24)) -> Sample:
    """A non-square image (so SAM's padding matters) with one mask."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        tmp_path / "scene.png")
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[4:12, 6:30] = 1
    return Sample(images=[tmp_path / "scene.png"], masks=[mask], source="t:0", turns=[
        {"role": "user", "content": "<image>\nSegment the block."},
        {"role": "assistant", "content": "Sure, it is [SEG]."}])


def test_the_head_takes_sams_weights_and_keeps_them_frozen(tokenizer, sam_file):
    path, sam = sam_file
    model = sam_vlm(tokenizer, path)
    head = model.seg_head
    assert model.config.seg.sam_encoder["img_size"] == 64 and head.grid_size == 8
    assert head.image_to_mask is None  # SAM's embeddings are the decoder's width already
    for name, tensor in sam.image_encoder.state_dict().items():
        torch.testing.assert_close(head.image_encoder.state_dict()[name], tensor, msg=name)
    for name, tensor in sam.mask_decoder.state_dict().items():
        torch.testing.assert_close(head.mask_decoder.state_dict()[name], tensor, msg=name)
    torch.testing.assert_close(head.prompt_encoder.no_mask_embed.weight,
                               sam.prompt_encoder.no_mask_embed.weight)
    set_trainable(model, "seg,lm")
    assert not any(p.requires_grad for p in head.image_encoder.parameters())
    assert all(p.requires_grad for p in head.mask_decoder.parameters())


def test_masks_follow_sams_own_frame(tokenizer, sam_file, tmp_path):
    """The head's mask equals SAM's path written out by hand: preprocess, encode, decode with the
    [SEG] prompt, upsample, crop the padding, resize to the image."""
    path, sam = sam_file
    model = sam_vlm(tokenizer, path).eval()
    sample = seg_sample(tmp_path)
    [masks] = segment_samples(model, tokenizer, ImageProcessor.for_tower(model.vision),
                              [sample], ["Sure, it is [SEG]."], threshold=-1e9)
    assert masks[0].shape == (24, 40) and bool(masks[0].all())  # at the image's own size
    image = np.asarray(Image.open(sample.images[0]).convert("RGB"))
    pixels = sam_preprocess(image, 64)
    resized = preprocess_shape(24, 40, 64)  # (38, 64): the longest side becomes 64
    assert pixels.shape == (3, 64, 64) and bool((pixels[:, resized[0]:, :] == 0).all())
    head = model.seg_head
    seg_hidden = torch.randn(1, model.config.lm.dim)
    with torch.no_grad():
        ours = head(seg_hidden, head.image_embeddings(pixels[None]), [(24, 40)])[0]
        embedding = sam.image_encoder(pixels[None])  # (1, 256, 8, 8)
        low_res, _ = sam.mask_decoder(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=head.text_hidden_fcs(seg_hidden)[:, None],
            dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(
                1, -1, 1, 1).expand(1, -1, 8, 8), multimask_output=False)
        expected = sam.postprocess_masks(low_res, resized, (24, 40))[0, 0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_cached_embeddings_train_exactly_as_pixels(tokenizer, sam_file, tmp_path):
    path, _ = sam_file
    model = sam_vlm(tokenizer, path)
    sample = seg_sample(tmp_path)
    encoder = model.seg_head.image_encoder
    calls = []

    def encode(image_path):
        calls.append(image_path)
        pixels = sam_preprocess(np.asarray(Image.open(image_path).convert("RGB")), 64)
        return encoder(pixels[None])[0]

    cache = FeatureCache(tmp_path / "cache", "sam tiny", encode)
    processor = ImageProcessor.for_tower(model.vision)
    dataset = ChatDataset([sample], tokenizer, processor, model.image_tokens_per_tile,
                          model.config.lm.max_seq_len, preload_images=False,
                          seg_image_cache=cache)
    cached = collate([dataset[0], dataset[0]], tokenizer.pad_id)  # a second epoch: a hit
    assert len(calls) == 1 and cached["seg_images"].shape == (2, 256, 8, 8)
    pixels = dict(cached, seg_images=torch.stack(
        [sam_preprocess(np.asarray(Image.open(sample.images[0]).convert("RGB")), 64)] * 2))
    torch.manual_seed(0)
    loss_cached = model(**cached).loss
    torch.manual_seed(0)
    loss_pixels = model(**pixels).loss
    torch.testing.assert_close(loss_cached, loss_pixels, rtol=1e-5, atol=1e-6)
    loss_cached.backward()  # the gradient reaches the decoder, not the frozen encoder
    assert model.seg_head.mask_decoder.iou_token.weight.grad is not None
    assert cached["labels"].ne(IGNORE_INDEX).any()


def test_a_checkpoint_rebuilds_the_sam_head_without_the_sam_file(tokenizer, sam_file, tmp_path):
    path, _ = sam_file
    model = sam_vlm(tokenizer, path)
    out = tmp_path / "run"
    save_checkpoint(out, 0, model=model, config={"stage": "test", "lora": None,
                                                 "model": model.config.to_dict()},
                    tokenizer=tokenizer, trainer_state={"scaler": {}},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))
    moved = tmp_path / "elsewhere.pth"
    path.rename(moved)  # the SAM file is gone: the checkpoint alone must do
    try:
        loaded, _, _ = load_vlm(out)
    finally:
        moved.rename(path)
    for name, tensor in model.seg_head.state_dict().items():
        torch.testing.assert_close(loaded.seg_head.state_dict()[name], tensor, msg=name)


def test_the_sam_encoder_needs_a_checkpoint():
    with pytest.raises(ValueError, match="--seg-image-encoder sam needs --seg-sam-checkpoint"):
        SegConfig(enabled=True, image_encoder="sam")


def test_mask_loss_weights_and_averages_masks_of_any_size():
    torch.manual_seed(0)
    predicted = [torch.randn(6, 5), torch.randn(9, 4)]
    targets = [torch.randint(0, 2, (6, 5), dtype=torch.uint8),
               torch.randint(0, 2, (9, 4), dtype=torch.uint8)]
    total, bce, dice = mask_loss(predicted, targets, bce_weight=2.0, dice_weight=0.5)
    bce_each = [sigmoid_bce_loss(p[None], t[None]) for p, t in zip(predicted, targets)]
    dice_each = [dice_loss(p[None], t[None]) for p, t in zip(predicted, targets)]
    torch.testing.assert_close(bce, sum(bce_each) / 2)
    torch.testing.assert_close(dice, sum(dice_each) / 2)
    torch.testing.assert_close(total, 2.0 * bce + 0.5 * dice)
    expected_bce = F.binary_cross_entropy_with_logits(predicted[0], targets[0].float())
    torch.testing.assert_close(bce_each[0], expected_bce)


def test_seg_config_and_the_decoder_config_convert_through_one_table():
    seg = SegConfig()
    assert seg.decoder_config() == MASK_DECODER_PRESETS["sam"].__class__()
    sam = SegConfig().with_decoder(MASK_DECODER_PRESETS["sam"])
    assert (sam.decoder_dim, sam.decoder_mlp_dim) == (256, 2048)
    assert sam.decoder_config() == MASK_DECODER_PRESETS["sam"]


def test_train_seg_mixes_lisas_four_kinds_through_sams_encoder(shapes_dir, tiny_tokenizer_dir,
                                                               sam_file, tmp_path, capsys):
    """LISA's hybrid data (sem_seg, refer_seg, reason_seg, vqa at 9:3:3:1) through a tiny SAM
    encoder: the loss goes down, a second run reads every embedding from the cache, and the
    trained model's masks come out at each image's own size."""
    path, _ = sam_file
    kinds = (shapes_dir / "sem_seg" / "train", shapes_dir / "refer",
             shapes_dir / "reasonseg" / "train", shapes_dir / "sft.json")

    def run(out, steps):
        return train_seg.main([
            "--tokenizer", str(tiny_tokenizer_dir), "--model-preset", "test",
            "--data", ",".join(map(str, kinds)), "--sample-rates", "9,3,3,1",
            "--seg-image-encoder", "sam", "--seg-sam-checkpoint", str(path),
            "--feature-cache", str(tmp_path / "cache"), "--out-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--lora-r", "0", "--lr", "3e-3",
            "--warmup-steps", "2", "--log-every", str(steps)])

    first = run(tmp_path / "one", 1)
    assert "SAM image embeddings: 0 image(s) encoded now" not in capsys.readouterr().out
    last = run(tmp_path / "many", 25)
    assert "SAM image embeddings: 0 image(s) encoded now" in capsys.readouterr().out
    assert last["train/loss"] < first["train/loss"]
    model, tokenizer, _ = load_vlm(tmp_path / "many")
    sample = read_dataset(shapes_dir / "sem_seg" / "val")[0]
    [masks] = segment_samples(model, tokenizer, ImageProcessor.for_tower(model.vision), [sample],
                              [sample.turns[-1]["content"]])
    assert [m.shape for m in masks] == [m.shape for m in sample.masks]
