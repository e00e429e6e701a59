"""2-D positions for image tokens (--image-positions 2d): the grid, the splice, what trains."""
from dataclasses import replace

import pytest
import torch

from conftest import tiny_vlm_config
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.models.attention_mask import ImageTokensConfig
from minivlm.models.build import build_vlm, build_vlm_from_config
from minivlm.models.image_positions import ImagePositions2D
from minivlm.models.vlm import VLMConfig
from minivlm.train.trainable import set_trainable


def test_each_token_gets_its_row_and_its_column_embedding():
    positions = ImagePositions2D(side=3, dim=2)
    with torch.no_grad():
        positions.row.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
        positions.col.copy_(torch.tensor([[0, 10.0], [0, 20], [0, 30]]))
    out = positions(torch.zeros(2, 9, 2))  # row-major: token 5 is row 1, column 2
    assert out[1, 5].tolist() == [2.0, 30.0]
    assert out[0, 0].tolist() == [1.0, 10.0] and out[0, 8].tolist() == [3.0, 30.0]


def test_the_vlm_adds_the_grid_to_every_tile_and_the_option_round_trips(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    config = tiny_vlm_config(seg=False)
    torch.manual_seed(0)
    plain = build_vlm(config, tokenizer)
    torch.manual_seed(0)
    with_2d = build_vlm(replace(config, image_tokens=ImageTokensConfig(positions="2d")),
                        tokenizer)
    side = int(with_2d.image_tokens_per_tile ** 0.5)  # the merged grid: 2x2 for the test preset
    assert with_2d.image_positions.row.shape == (side, with_2d.config.lm.dim)
    with torch.no_grad():
        with_2d.image_positions.row.normal_()
        with_2d.image_positions.col.normal_()
    with_2d.load_state_dict(plain.state_dict() | {
        k: v for k, v in with_2d.state_dict().items() if k.startswith("image_positions.")})
    ids = torch.full((1, 2 * with_2d.image_tokens_per_tile), tokenizer.image_token_id)
    pixels = torch.randn(2, 3, 32, 32)  # two tiles: both get the same grid
    delta = with_2d.embed(ids, pixels)[0] - plain.embed(ids, pixels)[0]
    grid = with_2d.image_positions(torch.zeros(1, side * side, with_2d.config.lm.dim))[0]
    torch.testing.assert_close(delta[0], torch.cat([grid, grid]))
    rebuilt = build_vlm_from_config(VLMConfig.from_dict(with_2d.config.to_dict()))
    assert rebuilt.image_positions is not None
    assert VLMConfig.from_dict({k: v for k, v in plain.config.to_dict().items()
                                if k != "image_tokens"}).image_tokens.positions == "none"


@pytest.mark.parametrize("parts,trains", [("projector", True), ("lm", False)])
def test_the_positions_train_with_the_projector(tiny_tokenizer_dir, parts, trains):
    config = replace(tiny_vlm_config(seg=False), image_tokens=ImageTokensConfig(positions="2d"))
    model = build_vlm(config, load_tokenizer(tiny_tokenizer_dir))
    set_trainable(model, parts, stage_parts=set())
    assert model.image_positions.row.requires_grad is trains


def test_unknown_positions_is_one_clear_error():
    with pytest.raises(ValueError, match="ImageTokensConfig.positions must be one of none, 2d"):
        ImageTokensConfig(positions="rope")
