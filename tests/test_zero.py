"""ZeRO1 and the DDP helpers against single-process AdamW and torch's ZeroRedundancyOptimizer.

One 2-rank gloo run on CPU (tests/_zero_worker.py, started with torchrun's environment) records
everything; each test compares one part of it with a single-process run of the same model on
the same global batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _zero_worker as worker
from minivlm.train.distributed import init_distributed
from minivlm.train.zero import (ZeRO1, clip_grad_norm_, optimizer_state_bytes,
                                partition_parameters)

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("zero")
    port = str(_free_port())
    processes = []
    for rank in range(WORLD_SIZE):
        env = {
            **os.environ,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_WORLD_SIZE": str(WORLD_SIZE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
        }
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_zero_worker.py"), str(out_dir)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    results = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    results[0]["out_dir"] = out_dir
    return results


def single_process(steps=range(worker.STEPS), *, params=None, state=None, clip=False,
                   optimizer_class=None):
    """Plain AdamW on the whole global batch; returns (model, optimizer, losses, norms)."""
    model = worker.build_model()
    if params is not None:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params):
                p.copy_(saved)
    optimizer = (optimizer_class or torch.optim.AdamW)(worker.param_groups(model))
    if state is not None:
        optimizer.load_state_dict(state)
    norm = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), worker.MAX_NORM)  # noqa: E731
    losses, norms = worker.train(model, optimizer, steps, clip=norm if clip else None)
    return model, optimizer, losses, norms


def assert_params_close(actual, expected, atol=1e-6):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def test_zero1_under_ddp_matches_single_process_adamw(ranks):
    model, _, _, _ = single_process()
    for result in ranks:
        assert_params_close(result["zero1"]["params"], list(model.parameters()))
    assert_params_close(ranks[0]["zero1"]["params"], ranks[1]["zero1"]["params"], atol=0)


def test_zero1_matches_torch_zero_redundancy_optimizer(ranks):
    # Same gradients, same partition, same AdamW arithmetic: bit-identical parameters.
    for result in ranks:
        assert_params_close(result["zero1"]["params"], result["torch_zero"]["params"], atol=0)
    assert ranks[0]["state_bytes"] == ranks[0]["torch_state_bytes"]


def test_ddp_loss_equals_single_process_loss(ranks):
    _, _, losses, _ = single_process()
    for result in ranks:
        torch.testing.assert_close(torch.stack(result["zero1"]["losses"]), torch.stack(losses),
                                   atol=1e-6, rtol=0)


def test_optimizer_state_is_sharded(ranks):
    model, optimizer, _, _ = single_process()
    full_bytes = optimizer_state_bytes(optimizer)
    largest = max(optimizer.state.values(), key=lambda s: s["exp_avg"].numel())
    largest_bytes = sum(v.numel() * v.element_size() for v in largest.values())
    per_rank = [result["state_bytes"] for result in ranks]
    assert sum(per_rank) == full_bytes
    assert all(b <= full_bytes / WORLD_SIZE + largest_bytes for b in per_rank)
    # Sorted-greedy partition: the 48x24 weight alone on rank 0, everything else on rank 1.
    assert ranks[0]["numel_per_rank"] == [1152, 768 + 192 + 48 + 24 + 24 + 24 + 8]
    shards = partition_parameters(worker.param_groups(model), WORLD_SIZE)
    assert [[p.shape for p in group] for group in shards[0]] == [[torch.Size([24, 48])], []]


def test_sharded_checkpoint_resume_equals_uninterrupted(ranks):
    for result in ranks:
        assert_params_close(result["resumed_shard"]["params"], result["zero1"]["params"], atol=0)
        assert_params_close(result["resumed_full"]["params"], result["zero1"]["params"], atol=0)
        assert "load_full_state_dict" in result["wrong_shard_error"]


def test_consolidated_state_is_plain_adamw_and_resumes_at_world_size_1(ranks):
    out_dir = ranks[0]["out_dir"]
    full = torch.load(out_dir / "full.pt")
    params_at_resume = torch.load(out_dir / "shard0.pt")["params"]
    # The consolidated dict has plain AdamW's layout and values after RESUME_AT steps.
    _, reference, _, _ = single_process(range(worker.RESUME_AT))
    expected = reference.state_dict()
    assert full["param_groups"] == expected["param_groups"]
    assert full["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(full["state"][index][name], value, atol=1e-6, rtol=0)
    model, _, _, _ = single_process(range(worker.RESUME_AT, worker.STEPS),
                                    params=params_at_resume, state=full)
    assert_params_close(list(model.parameters()), ranks[0]["zero1"]["params"])


def test_clipping_with_global_norm_matches_single_process(ranks):
    model, _, _, norms = single_process(clip=True)
    assert all(n > worker.MAX_NORM for n in norms)  # clipping was active on every step
    for result in ranks:
        torch.testing.assert_close(torch.stack(result["clip_full"]["norms"]), torch.stack(norms),
                                   atol=0, rtol=1e-6)
        assert_params_close(result["clip_full"]["params"], list(model.parameters()))


def test_gradient_accumulation_with_no_sync(ranks):
    model, _, _, _ = single_process()
    for result in ranks:
        assert_params_close(result["accumulated"]["params"], list(model.parameters()))
    assert not torch.allclose(ranks[0]["grad_unsynced"], ranks[1]["grad_unsynced"])
    torch.testing.assert_close(ranks[0]["grad_synced"], ranks[1]["grad_synced"], atol=0, rtol=0)


def test_collectives(ranks):
    for result in ranks:
        assert result["mean_float"] == 0.5
        assert result["mean_tensor"].tolist() == [0.5, 1.0]


def test_world_size_1_is_plain_adamw_exactly():
    model, adamw, _, norms = single_process(clip=True)
    zero_model, zero, _, zero_norms = single_process(clip=True, optimizer_class=ZeRO1)
    assert zero.world_size == 1
    assert_params_close(list(zero_model.parameters()), list(model.parameters()), atol=0)
    assert torch.equal(torch.stack(zero_norms), torch.stack(norms))
    # Same state-dict layout and values as the plain optimizer; consolidation is the identity.
    for state_dict in (zero.state_dict(), zero.consolidate_state_dict()):
        assert state_dict["param_groups"] == adamw.state_dict()["param_groups"]
        for index, state in adamw.state_dict()["state"].items():
            for name, value in state.items():
                assert torch.equal(state_dict["state"][index][name], value)
    assert optimizer_state_bytes(zero) == optimizer_state_bytes(adamw)


def test_clip_grad_norm_with_no_gradients_returns_zero():
    layer = torch.nn.Linear(2, 2)
    assert clip_grad_norm_(layer.parameters(), 1.0).item() == 0.0


def test_init_distributed(monkeypatch):
    env = init_distributed(ddp=False, device_hint="cpu")
    assert (env.rank, env.world_size, env.is_main, env.device) == (0, 1, True, torch.device("cpu"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        init_distributed(ddp=True, device_hint="cpu")
