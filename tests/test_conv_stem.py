"""--vision-stem conv: the same token grid as the patch embedding, saved and rebuilt exactly."""
import pytest
import torch

from minivlm.load import load_vlm
from minivlm.models.build import build_vision_tower, build_vlm
from minivlm.models.conv_stem import ConvStem
from minivlm.models.presets import preset_config
from minivlm.models.vision import VisionConfig
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_conv_stem_gives_the_patch_embeddings_grid(patch_size):
    stem = ConvStem(patch_size, width=48)
    patch = torch.nn.Conv2d(3, 48, kernel_size=patch_size, stride=patch_size)
    pixels = torch.randn(2, 3, 32, 32)
    assert stem(pixels).shape == patch(pixels).shape == (2, 48, 32 // patch_size, 32 // patch_size)
    strides = [m.stride[0] for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2] * (patch_size.bit_length() - 1) + [1]


def test_conv_stem_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="power of two"):
        ConvStem(6, width=32)
    with pytest.raises(ValueError, match="replaces the patch embedding"):
        VisionConfig(stem="conv", pretrained="openai")


def test_tower_uses_the_stem_and_a_checkpoint_rebuilds_it(tiny_tokenizer_dir, tmp_path):
    tower = build_vision_tower(VisionConfig(stem="conv", width=32, layers=1, head_width=16))
    assert isinstance(tower.visual.conv1, ConvStem)
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 64, 32)
    torch.manual_seed(0)
    config = preset_config("test")
    config.vision.stem = "conv"
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_vlm(config, tokenizer).eval()
    save_checkpoint(tmp_path, 0, model=model, config={"stage": "test",
                                                      "model": model.config.to_dict(),
                                                      "lora": None},
                    tokenizer=tokenizer, trainer_state={},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))
    loaded, _, _ = load_vlm(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval().vision(pixels), model.vision(pixels), rtol=0, atol=0)
