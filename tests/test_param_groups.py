"""Which parameters decay and at which learning rate (--vision-lr-scale)."""
import torch

import train_pretrain
from conftest import tiny_vlm_config
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.models.build import build_vlm
from minivlm.train.config import param_groups


def test_groups_cover_each_trainable_parameter_once_with_the_towers_scale(tiny_tokenizer_dir):
    model = build_vlm(tiny_vlm_config(seg=False), load_tokenizer(tiny_tokenizer_dir))
    tower = {id(p) for p in model.vision.parameters()}
    groups = param_groups(model, weight_decay=0.1, vision_lr_scale=3.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for group in groups:
        in_tower = {id(p) in tower for p in group["params"]}
        assert in_tower == {group["lr_scale"] == 3.0}  # a group is all tower or all the rest
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
    assert len(param_groups(model, 0.1)) == 2  # scale 1: today's two groups


def test_scaled_tower_lr_reaches_the_optimizer(shapes_dir, tiny_tokenizer_dir, tmp_path):
    train_pretrain.main(["--data", str(shapes_dir / "pretrain.json"), "--tokenizer",
                         str(tiny_tokenizer_dir), "--out-dir", str(tmp_path), "--max-steps", "2",
                         "--model-preset", "demo-quick", "--batch-size", "4", "--lr", "1e-3",
                         "--warmup-steps", "4", "--vision-lr-scale", "2.5"])
    state = torch.load(tmp_path / "step_000002" / "optimizer_rank0.pt", weights_only=True)
    rates = sorted({round(g["lr"], 12) for g in state["param_groups"]})
    assert rates == [round(1e-3 * 2 / 4, 12), round(2.5e-3 * 2 / 4, 12)]  # warmup step 2 of 4
