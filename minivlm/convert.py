"""Convert a llama.cpp GGUF file into checkpoint directories, dequantised once.

    python -m minivlm.convert SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2/
    python -m minivlm.convert SmolLM2-135M-Instruct.Q4_1.gguf --hf-out smollm2-hf/ --dtype bfloat16
    python -m minivlm.convert SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-int4/ --quantize int4

--out     minivlm's layout: config.json ({"lm": TransformerConfig}), model.safetensors under our
          parameter names, tokenizer/ (minivlm's tokenizer files). `load_converted` reads it back.
          With --quantize int8|int4 the LM's Linears are stored quantised and config.json records
          the scheme and format (minivlm/quant/checkpoint.py); --hf-out stays unquantised.
--hf-out  Hugging Face's layout: config.json, model.safetensors, generation_config.json,
          tokenizer.json and tokenizer_config.json with the GGUF's own Jinja chat template.
          transformers' AutoModelForCausalLM / AutoTokenizer load it, and so does `--lm-hf DIR`.
Loading a GGUF dequantises every block on each load; a converted directory loads in a fraction
of the time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.errors import run_cli
from minivlm.files import atomic_path, write_json_atomic
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.quant.checkpoint import load_quantized_lm, quant_record
from minivlm.quant.swap import add_quantize_args, quantize_model
from minivlm.weights.gguf import read_gguf_checkpoint
from minivlm.weights.gguf_tokenizer import build_gguf_tokenizer, tokenizer_from_metadata


def save_minivlm(model: Transformer, tokenizer, out: Path, quantize: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_model(model, str(tmp))  # stores tied lm_head once
    tokenizer.save(out / "tokenizer")
    config = {"lm": model.config.to_dict()} | ({"quantize": quantize} if quantize else {})
    write_json_atomic(out / "config.json", config)


def load_converted(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a directory written by `--out`. A quantised one comes back
    quantised, in the dtype it was written in (`dtype` is then not used), reference path."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if "lm" not in config:
        raise ValueError(f"{path / 'config.json'}: no 'lm' section; expected a directory "
                         "written by `python -m minivlm.convert --out`")
    weights = path / "model.safetensors"
    lm_config = TransformerConfig(**config["lm"])
    if "quantize" in config:
        model = load_quantized_lm(lm_config, load_file(weights), config["quantize"],
                                  str(path / "config.json"))
    else:
        model = Transformer.from_state_dict(lm_config, load_file(weights), dtype, str(weights))
    return model, load_tokenizer(path / "tokenizer")


def save_hf(model: Transformer, metadata: dict, out: Path, source: str) -> None:
    """Weights through `Transformer.to_hf`; the tokenizer as the GGUF describes it, without the
    tokens minivlm adds ("<image>", "[SEG]"), so transformers sees the original model."""
    model.to_hf(out)
    with atomic_path(out / "tokenizer.json") as tmp:
        build_gguf_tokenizer(metadata, source).save(str(tmp))
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = {name: metadata.get(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "padding", "unknown")}
    token = {name: tokens[i] if i is not None else None for name, i in ids.items()}
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token["bos"], "eos_token": token["eos"], "pad_token": token["padding"],
        "unk_token": token["unknown"], "model_max_length": model.config.max_seq_len,
        "chat_template": metadata.get("tokenizer.chat_template"),
    })
    # So that transformers' generate stops at the model's end token without being told.
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=Path, help="a llama / qwen2 GGUF file")
    parser.add_argument("--out", type=Path, help="write minivlm's layout here")
    parser.add_argument("--hf-out", type=Path, help="write Hugging Face's layout here")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_quantize_args(parser)
    args = parser.parse_args(argv)
    if args.out is None and args.hf_out is None:
        parser.error("pass --out DIR and/or --hf-out DIR")
    config, state, metadata = read_gguf_checkpoint(args.gguf)
    model = Transformer.from_state_dict(TransformerConfig(**config), state,
                                        getattr(torch, args.dtype), str(args.gguf))
    del state  # the model holds a copy: not two of them in memory while saving
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.gguf}: {metadata['general.architecture']}, {params:.0f}M parameters, "
          f"{model.config.num_layers} layers, vocabulary {model.config.vocab_size}")
    if args.hf_out is not None:  # Hugging Face's layout has no place for our int4 tensors
        save_hf(model, metadata, args.hf_out, str(args.gguf))
        print(f"wrote {args.hf_out} (Hugging Face)")
    if args.out is not None:
        record = None
        if args.quantize:
            quantize_model(model, args.quantize, args.quantize_group_size, kernels=False)
            record = quant_record(args.quantize, args.quantize_group_size)
        save_minivlm(model, tokenizer_from_metadata(metadata, str(args.gguf)), args.out, record)
        print(f"wrote {args.out} (minivlm{', ' + args.quantize if args.quantize else ''})")


if __name__ == "__main__":
    run_cli(main)
