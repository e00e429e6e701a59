"""The tokenizer a GGUF file carries, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

A GGUF has no tokenizer.json: llama.cpp stores the pieces as metadata under `tokenizer.ggml.*`.
For a "gpt2" (byte-level BPE) vocabulary, as SmolLM2, Llama 3 and Qwen2 use, that is:
  tokens      the vocabulary, id = position, already spelled in GPT-2's byte alphabet ("Ġthe")
  merges      "Ġ t" pairs in merge order
  token_type  1 normal, 3 control (<|im_end|>: matched whole, a special token), 4 user-defined
  pre         which regex splits text into words before BPE (llama.cpp's `llama-vocab.cpp`)
  bos/eos/padding/unknown_token_id, add_bos_token, and `tokenizer.chat_template` (Jinja)

    tokenizer = load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from minivlm.data.chat_template import ChatTemplate
from minivlm.data.hf_tokenizer import HFTokenizer, wrap_tokenizers
from minivlm.weights.gguf import open_gguf, read_metadata

# Word-splitting regexes, as in llama.cpp's llama-vocab.cpp (same text as the models'
# tokenizer.json). Several are applied in turn, each splitting the pieces of the previous one.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # every digit on its own first
    "llama-bpe": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token_type values


def build_gguf_tokenizer(metadata: dict[str, Any], source: str) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer described by `tokenizer.ggml.*` metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; expected "
                         "'gpt2' (byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; expected one "
                         f"of {sorted(PRE_TOKENIZER_SPLITS)}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.tokens and tokenizer.ggml.merges are "
                         "required for a gpt2 tokenizer")

    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    # A merge is two pieces separated by one space; a real space is spelled "Ġ", so no piece
    # holds one.
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    # Split words with the regexes, then map each byte to its printable stand-in (GPT-2's table).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated")
         for split in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()

    # Control and user-defined tokens are matched whole in raw text, before the regexes; they are
    # in the vocabulary already, so adding them keeps their ids.
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([tokenizers.AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, types) if kind == USER_DEFINED])

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    return tokenizer


def tokenizer_from_metadata(metadata: dict[str, Any], source: str,
                            chat_template: str | ChatTemplate | None = None) -> HFTokenizer:
    """The GGUF's tokenizer in minivlm's interface, with the file's special tokens and chat
    template (ChatML is recognised in its Jinja; `chat_template` overrides it).

    The wrapper adds "<image>" and "[SEG]" when the vocabulary lacks them
    (`tokenizer.num_added_tokens`): grow the model with `resize_token_embeddings` before use.
    """
    backend = build_gguf_tokenizer(metadata, source)
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return wrap_tokenizers(backend, eos_token=token("eos_token_id"),
                           bos_token=token("bos_token_id"), pad_token=token("padding_token_id"),
                           chat_template=chat_template,
                           jinja=metadata.get("tokenizer.chat_template"))


def load_gguf_tokenizer(path: str | Path, chat_template: str | ChatTemplate | None = None
                        ) -> HFTokenizer:
    return tokenizer_from_metadata(read_metadata(open_gguf(path)), str(path), chat_template)
