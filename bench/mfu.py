"""Distance to the hardware limit: a training step's model FLOP/s against the machine's GEMM peak.

    python bench/mfu.py                                   # demo, ~125M, SmolLM2-135M; auto device
    python bench/mfu.py --sizes demo --steps 10 --no-hf --json runs/mfu.json

1. Peak: a plain square matmul (fp32 on CPU, bf16 on CUDA) at a few sizes, each timed as a burst of
   back-to-back calls (sustained, not one lucky call); the best size's FLOP/s is the peak. It is
   the measured peak, not the datasheet's (an H100 SXM sells 989 dense bf16 TFLOP/s; cuBLAS
   sustains less), so the MFU here is the fraction of what this machine can really do.
2. Achieved: one LM training step, forward + cross-entropy + backward + AdamW step, of our
   Transformer (eager, and torch.compile'd as `--compile` trains) and of transformers'
   LlamaForCausalLM holding the same weights (sdpa attention, loss from `labels=`), alternated
   round by round in one process so that load from other programs falls on all of them alike;
   the median round of each counts. On CUDA under bf16 autocast, as the trainer runs.
3. Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6·N + 12·L·d·T, where N is
   every weight that enters a matmul (q/k/v/o with GQA's smaller k/v, the SwiGLU's three matrices,
   and the LM head, tied or not: a tied head still multiplies by the embedding matrix) but not the
   embedding lookup, a gather; 12·L·d·T is QKᵀ and attention·V, forward and backward, counted for
   the full T×T square as PaLM does (causal kernels skip half). The optimizer step and elementwise
   work (norms, RoPE, SiLU, softmax) are not model FLOPs: they are the cost MFU exposes.
MFU = achieved / peak. Goals (issue): on a CPU >= 70% at ~125M and compiled >= 1.2x HF eager; on a
GPU bf16 MFU >= 45% at ~125M.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.devices import add_device_arg, resolve_device  # noqa: E402
from minivlm.models.presets import MODEL_PRESETS  # noqa: E402
from minivlm.models.transformer import PRESETS, Transformer, TransformerConfig  # noqa: E402
from minivlm.train.config import param_groups, resolve_dtype  # noqa: E402

DEMO_VOCAB = 640  # demo.py's default --vocab (a copy: demo.py is a script, not imported here)
FORMULA = "model FLOPs/token = 6*N + 12*L*d*T (PaLM appendix B; N = matmul weights)"


@dataclass
class Size:
    config: TransformerConfig
    cpu_batch: int  # a step of a few seconds on 2 CPU cores at --seq-len 256
    cuda_batch: int
    shape: str


SIZES = {
    # demo.py's LM (MODEL_PRESETS["demo"]) with its tokenizer's vocabulary.
    "demo": Size(TransformerConfig(vocab_size=DEMO_VOCAB,
                                   **MODEL_PRESETS["demo"]["lm"]), 8, 64, "demo LM"),
    "125m": Size(TransformerConfig(**PRESETS["gpt-125m"]), 1, 16,
                 "GPT-2-small-like with Llama blocks, untied head"),
    "smollm2-135m": Size(TransformerConfig(**PRESETS["smollm2-135m"]), 1, 16,
                         "SmolLM2-135M shape (random weights), tied head"),
}


# ---------------------------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------------------------

def matmul_params(config: TransformerConfig) -> int:
    """N: weights that enter a matmul, per token once. The embedding lookup is a gather, not a
    matmul; the LM head is a d x V matmul whether or not it shares the embedding's storage."""
    d, kv_dim = config.dim, config.num_kv_heads * config.head_dim
    attention = d * d + 2 * d * kv_dim + d * d  # q, k and v (GQA: kv_dim <= d), o
    mlp = 3 * d * config.hidden_dim  # gate, up, down
    return config.num_layers * (attention + mlp) + d * config.vocab_size


def flops_per_token(config: TransformerConfig, seq_len: int) -> int:
    """Training FLOPs per token: 2 (multiply-add) x 3 (forward + 2x backward) per matmul weight,
    plus QK^T and attention.V (each 2·T·d per token and layer, forward) times 3."""
    return 6 * matmul_params(config) + 12 * config.num_layers * config.dim * seq_len


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA calls return before the kernels finish


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def gemm_peak(device: torch.device, dtype: torch.dtype, sizes: list[int],
              burst_seconds: float) -> dict[int, float]:
    """FLOP/s of an n x n x n matmul per size: the best of 3 bursts of ~burst_seconds each."""
    rates = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        one = min(timed(lambda: torch.mm(a, b, out=out), device) for _ in range(2))
        calls = max(1, round(burst_seconds / one))

        def burst():
            for _ in range(calls):
                torch.mm(a, b, out=out)

        rates[n] = max(2 * n ** 3 * calls / timed(burst, device) for _ in range(3))
    return rates


# ---------------------------------------------------------------------------------------------
# The training step, ours and transformers'
# ---------------------------------------------------------------------------------------------

def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    # The trainer's optimizer (groups, betas); a small lr so that repeated steps stay finite.
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-5, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, optimizer, ids: torch.Tensor, hf: bool, dtype: torch.dtype):
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        if hf:  # LlamaForCausalLM shifts the labels itself and takes the loss in fp32
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:  # as models/vlm.py: the loss in fp32
            logits = model(ids)  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_twin(model: Transformer, device: torch.device):
    # Imported here, not at the top: the FLOP count (and its test) should not wait for
    # transformers to import.
    from bench.lm_speed import hf_twin as build
    return build(model).to(device)


def measure_size(name: str, size: Size, args, device, dtype) -> list[dict]:
    """Median step time of each run (ours eager, ours compiled, HF eager), alternated."""
    batch = args.batch_size or (size.cuda_batch if device.type == "cuda" else size.cpu_batch)
    config = replace(size.config, max_seq_len=max(size.config.max_seq_len, args.seq_len))
    torch.manual_seed(0)
    ours = Transformer(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (batch, args.seq_len), device=device)
    ours_optimizer = adamw(ours)
    runs = {"ours eager": lambda: train_step(ours, ours_optimizer, ids, False, dtype)}
    if not args.no_hf:
        hf = hf_twin(ours, device).train()
        hf_optimizer = adamw(hf)
        runs["HF eager"] = lambda: train_step(hf, hf_optimizer, ids, True, dtype)
    compile_seconds = None
    if not args.no_compile:
        compiled = torch.compile(ours)  # the same parameters, so the same optimizer
        try:
            compile_seconds = timed(lambda: train_step(compiled, ours_optimizer, ids, False,
                                                       dtype), device)
            runs["ours compiled"] = lambda: train_step(compiled, ours_optimizer, ids, False,
                                                       dtype)
            print(f"{name}: torch.compile's first step took {compile_seconds:.0f} s", flush=True)
        except Exception as error:  # a missing C++ compiler, an unsupported op: report, go on
            print(f"{name}: torch.compile failed, eager only: "
                  f"{type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    seconds = {label: [] for label in runs}
    for _ in range(args.steps):
        for label, run in runs.items():
            seconds[label].append(timed(run, device))
    print(f"{name}: done", flush=True)

    tokens = batch * args.seq_len
    flops = tokens * flops_per_token(config, args.seq_len)
    hf_median = statistics.median(seconds["HF eager"]) if "HF eager" in seconds else None
    rows = []
    for label in sorted(seconds, key=["ours eager", "ours compiled", "HF eager"].index):
        times = seconds[label]
        median = statistics.median(times)
        rows.append(dict(
            size=name, shape=size.shape, run=label, batch=batch, seq_len=args.seq_len,
            matmul_params=matmul_params(config),
            params=sum(p.numel() for p in ours.parameters()),
            flops_per_step=flops, step_seconds=times, median_seconds=median,
            tokens_per_second=tokens / median, achieved_flops=flops / median,
            best_achieved_flops=flops / min(times),
            vs_hf_eager=hf_median / median if hf_median and label != "HF eager" else None,
            compile_seconds=compile_seconds if label == "ours compiled" else None))
    return rows


def print_table(rows: list[dict], peak: float):
    print("\n| size | run | batch x seq | step ms | tok/s | GFLOP/s | MFU | MFU (best step) "
          "| vs HF eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['vs_hf_eager']:.2f}x" if row["vs_hf_eager"] else "-"
        print(f"| {row['size']} | {row['run']} | {row['batch']}x{row['seq_len']} "
              f"| {1000 * row['median_seconds']:,.0f} | {row['tokens_per_second']:,.0f} "
              f"| {row['achieved_flops'] / 1e9:,.1f} | {row['achieved_flops'] / peak:.1%} "
              f"| {row['best_achieved_flops'] / peak:.1%} | {ratio} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arg(parser)
    parser.add_argument("--seq-len", type=int, help="default 256 on CPU, 1024 on CUDA")
    parser.add_argument("--batch-size", type=int, help="default per size and device (SIZES)")
    parser.add_argument("--steps", type=int, help="timed rounds; default 4 on CPU, 20 on CUDA")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compile")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.sizes.split(",")
    if unknown := [name for name in names if name not in SIZES]:
        parser.error(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    args.seq_len = args.seq_len or (1024 if on_cuda else 256)
    args.steps = args.steps or (20 if on_cuda else 4)
    dtype = resolve_dtype("auto", device)  # the trainer's choice: bf16 on CUDA, fp32 on CPU
    name = torch.cuda.get_device_name(device) if on_cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device.type} ({name}), {dtype}, seq {args.seq_len}, "
          f"{args.warmup} warm-up + {args.steps} timed rounds, medians")

    gemm_sizes = [2048, 4096, 8192] if on_cuda else [512, 1024, 2048]
    burst_seconds = 0.5 if on_cuda else 1.0
    gemm = gemm_peak(device, dtype, gemm_sizes, burst_seconds)
    print("GEMM before: " + ", ".join(f"{n}^3 {rate / 1e9:,.0f}" for n, rate in gemm.items())
          + " GFLOP/s", flush=True)
    print(FORMULA)
    for size_name in names:
        config = SIZES[size_name].config
        print(f"  {size_name} ({SIZES[size_name].shape}): N = {matmul_params(config):,}, "
              f"L = {config.num_layers}, d = {config.dim}, "
              f"{flops_per_token(config, args.seq_len) / 1e6:,.0f} MFLOP/token at T = "
              f"{args.seq_len}")

    rows = []
    for size_name in names:
        rows += measure_size(size_name, SIZES[size_name], args, device, dtype)
        if on_cuda:
            torch.cuda.empty_cache()
    # Measured again after the steps, the best of both is the peak: load from other programs
    # only ever lowers a rate, and a GPU may clock differently once warm.
    after = gemm_peak(device, dtype, gemm_sizes, burst_seconds)
    print("GEMM after: " + ", ".join(f"{n}^3 {rate / 1e9:,.0f}" for n, rate in after.items())
          + " GFLOP/s")
    gemm = {n: max(gemm[n], after[n]) for n in gemm_sizes}
    peak = max(gemm.values())
    print(f"peak (best sustained GEMM): {peak / 1e9:,.0f} GFLOP/s")
    print_table(rows, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            device=str(device), device_name=name, dtype=str(dtype), torch=torch.__version__,
            formula=FORMULA, gemm_flops={str(n): rate for n, rate in gemm.items()},
            peak_flops=peak, rows=[dict(row, mfu=row["achieved_flops"] / peak) for row in rows],
        ), indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
