"""--fsdp (minivlm/train/fsdp.py) against DDP, through the real Trainer on 2 gloo ranks on CPU.

One 2-rank run (tests/_fsdp_worker.py) trains the tiny VLM with DDP, FSDP, FSDP + activation
checkpointing, and resumes from an FSDP checkpoint three ways; each test compares one part of
what it saved. Its data mixes examples with and without masks, so on some steps only one rank
runs the mask decoder (the case FSDP2 cannot take unaided).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import _fsdp_worker as worker
from minivlm.consolidate import consolidate
from minivlm.errors import CheckpointError
from minivlm.load import load_vlm
from minivlm.train.checkpoint import load_model_and_optimizer, load_optimizer_state
from minivlm.train.distributed import DistributedEnv, init_distributed
from minivlm.train.fsdp import load_fsdp_weights
from minivlm.train.stage import parse_args
from minivlm.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2


@pytest.fixture(scope="module")
def fsdp_run(shapes_dir, tiny_tokenizer_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    processes = []
    for rank in range(WORLD_SIZE):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_fsdp_worker.py"), str(out), str(shapes_dir),
             str(tiny_tokenizer_dir)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def weights(out: Path, run: str, step: int = worker.STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / run / f"step_{step:06d}" / "model.safetensors"))


def without_key_biases(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights less the attention key biases. Adding a bias b to every key adds q·b to each
    of a query's logits alike, which softmax ignores: a key bias's true gradient is zero and what
    it gets is rounding noise, which DDP's all-reduce and FSDP's reduce-scatter round differently
    and Adam scales up to ~lr per step. Nothing the model computes depends on them."""
    kept = {name: w for name, w in weights.items() if not name.endswith("k_proj.bias")}
    for name, w in weights.items():  # open_clip's fused q|k|v bias: drop its middle third
        if name.endswith("in_proj_bias"):
            q, _, v = w.chunk(3)
            kept[name] = torch.cat([q, v])
    return kept


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_fsdp_matches_ddp_after_k_steps(fsdp_run):
    out, ranks = fsdp_run
    # Some step gave one rank masks and the other none: the mask decoder ran on one rank only.
    assert ranks[0]["has_masks"] != ranks[1]["has_masks"]
    fsdp, ddp = weights(out, "fsdp"), weights(out, "ddp")
    assert max_difference(without_key_biases(fsdp), without_key_biases(ddp)) <= 1e-5
    assert max_difference(fsdp, weights(out, "fsdp", worker.RESUME_AT)) > 1e-3  # it trained


def test_fsdp_with_activation_checkpointing_is_identical(fsdp_run):
    out, _ = fsdp_run
    assert max_difference(weights(out, "fsdp_ac"), weights(out, "fsdp")) == 0


def test_fsdp_resume_on_the_same_world_size_is_exact(fsdp_run):
    out, _ = fsdp_run
    saved = out / "fsdp" / f"step_{worker.RESUME_AT:06d}"
    assert sorted(p.name for p in saved.glob("optimizer_rank*.pt")) == [
        "optimizer_rank0.pt", "optimizer_rank1.pt"]
    assert max_difference(weights(out, "resume"), weights(out, "fsdp")) == 0


def test_fsdp_checkpoint_loads_in_one_process_with_the_same_logits(fsdp_run):
    out, ranks = fsdp_run
    # ranks[0]["logits"]: rank 0 alone ran the sharded model during Trainer validation, mid-run
    # (training went on after it: test_fsdp_matches_ddp_after_k_steps) and at the end.
    for step, validated in zip((worker.RESUME_AT, worker.STEPS), ranks[0]["logits"], strict=True):
        model, _, _ = load_vlm(out / "fsdp" / f"step_{step:06d}")
        with torch.no_grad():
            torch.testing.assert_close(model.lm(worker.PROBE_IDS), validated, atol=1e-6, rtol=0)
    assert "logits" not in ranks[1]


def test_fsdp_consolidated_checkpoint_resumes_under_ddp_and_zero1(fsdp_run, tmp_path):
    out, _ = fsdp_run
    for run in ("ddp_resume", "zero1_resume"):
        assert max_difference(without_key_biases(weights(out, run)),
                              without_key_biases(weights(out, "fsdp"))) <= 1e-5
    # The merged shards are plain AdamW's state dict: the DDP run's, up to rounding.
    ckpt = tmp_path / "step"
    shutil.copytree(out / "fsdp" / f"step_{worker.STEPS:06d}", ckpt)
    full = torch.load(consolidate(ckpt))
    ddp = torch.load(out / "ddp" / f"step_{worker.STEPS:06d}" / "optimizer_rank0.pt")
    assert full["param_groups"] == ddp["param_groups"]
    assert full["state"].keys() == ddp["state"].keys()
    for index, state in ddp["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(full["state"][index][name], value, atol=1e-6, rtol=0)


def test_fsdp_checkpoint_at_another_world_size_is_refused(fsdp_run):
    out, _ = fsdp_run
    ckpt = out / "fsdp" / f"step_{worker.STEPS:06d}"  # never consolidated in place
    model, _, _ = load_vlm(ckpt)
    with pytest.raises(ValueError, match=r"sharded over 2 ranks \(--fsdp\), this run has 1 "
                                         r"\(unsharded\); run `python -m minivlm.consolidate"):
        load_model_and_optimizer(ckpt, model, torch.optim.AdamW(model.parameters()),
                                 init_distributed(False), zero1=False, fsdp=False)
    one_rank = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"this run has 1 \(--fsdp\)"):
        load_optimizer_state(ckpt, one_rank, zero1=False, fsdp=True)
    with pytest.raises(ValueError, match=r"\(--fsdp\), this run has 2 \(--zero1\)"):
        load_optimizer_state(ckpt, DistributedEnv(0, 0, 2, torch.device("cpu")), zero1=True)


def test_fsdp_bad_flags():
    with pytest.raises(ValueError, match="--fsdp and --zero1 both shard"):
        TrainConfig(ddp=True, fsdp=True, zero1=True)
    with pytest.raises(ValueError, match="--fsdp .* needs --ddp: torchrun --nproc_per_node N"):
        TrainConfig(fsdp=True)
    # The scripts' flags come from TrainConfig: a bad pair stops them before anything loads.
    with pytest.raises(ValueError, match="needs --ddp"):
        parse_args("test", ["--fsdp", "--tokenizer", "x"])
    assert TrainConfig(ddp=True, fsdp=True).fsdp


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.embed.weight  # (4, 3), stored once by save_model


def test_fsdp_weights_are_checked_like_load_weights(tmp_path):
    """load_fsdp_weights reads through read_weights (on an unsharded model: no torchrun)."""
    source, path = TiedModel(), tmp_path / "model.safetensors"
    save_model(source, str(path))
    model = TiedModel()
    load_fsdp_weights(model, path)
    assert torch.equal(model.head.weight, source.embed.weight)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_fsdp_weights(model, path)
    for state, problem in [({}, r"missing tensor 'embed.weight' \(4, 3\)"),
                           ({"embed.weight": torch.zeros(5, 3)}, r"has shape \(5, 3\), the "
                                                                 r"model expects \(4, 3\)"),
                           ({"embed.weight": torch.zeros(4, 3), "extra": torch.zeros(1)},
                            "unexpected tensor 'extra'")]:
        save_file(state, str(path))
        with pytest.raises(ValueError, match=problem):
            load_fsdp_weights(model, path)
