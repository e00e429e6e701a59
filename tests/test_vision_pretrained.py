"""A named open_clip tower whose CLIP weights come from a local file (--vision-pretrained FILE).

Nothing can be downloaded here, so the file is made: a randomly initialised ViT-S-32-alt (the
smallest named ViT open_clip ships a config for), saved as open_clip's training script saves a
checkpoint. The reference is open_clip's own `create_model(name, pretrained=FILE)` reading the
same file; a tower that ignored the file would be a fresh random one, and must not match.
"""
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch

from minivlm.errors import one_line
from minivlm.load import load_vlm
from minivlm.models.build import build_vision_tower, build_vlm_from_config
from minivlm.models.presets import preset_config
from minivlm.models.vision import VisionConfig
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.train.stage import parse_args, prepare_model

MODEL_NAME = "ViT-S-32-alt"  # 224 px images, 32 px patches, width 384, 12 layers


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    clip = open_clip.create_model(MODEL_NAME)
    with torch.no_grad():  # init sets norms to 1 and biases to 0: random ones make a swap visible
        for name, param in clip.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.2 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    # open_clip's training script writes {"epoch", "name", "state_dict", "optimizer"}; its loader
    # (factory.load_state_dict) reads the "state_dict" entry.
    torch.save({"epoch": 1, "name": MODEL_NAME, "state_dict": clip.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_tokens(clip_file, pixels) -> torch.Tensor:
    """open_clip's own model loading the file: its image tower's patch tokens."""
    visual = open_clip.create_model(MODEL_NAME, pretrained=str(clip_file)).visual.eval()
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual(pixels)
    return tokens  # (1, 49, 384)


def patch_tokens(tower, pixels) -> torch.Tensor:
    with torch.no_grad():
        return tower.eval()(pixels)


def test_named_tower_loads_the_file_as_open_clip_does(clip_file, pixels, reference_tokens):
    tower = build_vision_tower(VisionConfig(model_name=MODEL_NAME, pretrained=str(clip_file)))
    vision_cfg = open_clip.get_model_config(MODEL_NAME)["vision_cfg"]
    # The resolved config records the named model's sizes, not VisionConfig's tiny defaults.
    assert (tower.config.image_size, tower.config.patch_size, tower.config.width) == (
        vision_cfg["image_size"], vision_cfg["patch_size"], vision_cfg["width"]) == (224, 32, 384)
    assert tower.num_patches == 49 and reference_tokens.shape == (1, 49, 384)
    torch.testing.assert_close(patch_tokens(tower, pixels), reference_tokens, atol=1e-5, rtol=0)
    random_tower = build_vision_tower(VisionConfig(model_name=MODEL_NAME))
    assert (patch_tokens(random_tower, pixels) - reference_tokens).abs().max() > 0.1


def test_wrong_path_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "no_such_clip.pt"
    with pytest.raises(ValueError) as error:
        build_vision_tower(VisionConfig(model_name=MODEL_NAME, pretrained=str(missing)))
    line = one_line(error.value)
    assert str(missing) in line and "no such file" in line and line == str(error.value)


def test_checkpoint_from_the_flags_keeps_the_tower_without_the_file(
        clip_file, pixels, reference_tokens, tiny_tokenizer_dir, tmp_path):
    # What train_pretrain.py does before its first step: flags -> model -> checkpoint. The mlp
    # projector because a 7x7 patch grid cannot be pixel-shuffled by the default merge of 2.
    args = parse_args("test", ["--tokenizer", str(tiny_tokenizer_dir), "--projector-kind", "mlp",
                               "--vision-model-name", MODEL_NAME,
                               "--vision-pretrained", str(clip_file)])
    env = init_distributed(False)
    model, tokenizer, run_config = prepare_model(args, env, "pretrain", auto_parts={"projector"})
    assert not any(p.requires_grad for p in model.vision.parameters())  # CLIP weights: frozen
    save_checkpoint(tmp_path / "run", 1, model=model, config=run_config, tokenizer=tokenizer,
                    trainer_state={"scaler": {}}, optimizer=torch.optim.AdamW(
                        p for p in model.parameters() if p.requires_grad), env=env)
    # load_vlm rebuilds the shapes from config.json and takes every weight from the checkpoint:
    # the CLIP file is no longer needed.
    moved = clip_file.rename(tmp_path / "moved.pt")
    try:
        model, _, run_config = load_vlm(tmp_path / "run")
    finally:
        moved.rename(clip_file)
    vision = run_config["model"]["vision"]
    assert (vision["model_name"], vision["pretrained"]) == (MODEL_NAME, str(clip_file))
    assert (vision["image_size"], vision["patch_size"], vision["width"]) == (224, 32, 384)
    torch.testing.assert_close(patch_tokens(model.vision, pixels), reference_tokens, atol=1e-5,
                               rtol=0)


def test_unknown_tower_name_and_unmergeable_grid_fail_when_the_model_is_built():
    config = preset_config("test")
    with pytest.raises(ValueError, match=r"--vision-model-name 'ViT-Nope': not an open_clip model"):
        build_vlm_from_config(replace(config, vision=replace(config.vision, model_name="ViT-Nope")))
    # 96 px / 32 px patches = a 3x3 grid: pixel_shuffle with merge 2 could only fail at step one.
    odd_grid = replace(config.vision, image_size=96, patch_size=32)
    with pytest.raises(ValueError, match=r"--projector-merge 2: the tower's 3x3 patch grid"):
        build_vlm_from_config(replace(config, vision=odd_grid))
