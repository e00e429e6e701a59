"""`load_tokenizer`: open whatever `Tokenizer.save` wrote, whichever backend (tokenizer.py).

Saved layout: tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) plus
tokenizer_config.json, whose "minivlm" section names the kind, files, special tokens and the chat
template; a plain Hugging Face tokenizer directory (no "minivlm" section) opens too.
"""
from __future__ import annotations

import json
from pathlib import Path

from minivlm.data.chat_template import ChatTemplate
from minivlm.data.hf_tokenizer import HFTokenizer, load_hf_tokenizer, read_tokenizer_json
from minivlm.data.sentencepiece_tokenizer import SentencePieceTokenizer
from minivlm.data.tokenizer import CONFIG_FILE, Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """What `Tokenizer.save` wrote; a plain Hugging Face tokenizer directory also works."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except json.JSONDecodeError as error:  # e.g. a save cut short by a full disk
        raise ValueError(f"{config_file}: not valid JSON ({error.msg}, line {error.lineno}); "
                         "the tokenizer directory is damaged") from None
    saved = config.get("minivlm")
    if saved is None:
        if (path / "tokenizer.json").is_file():
            return load_hf_tokenizer(path)
        raise ValueError(f"{config_file}: no 'minivlm' section and no tokenizer.json beside it; "
                         f"expected a directory written by Tokenizer.save")
    template = ChatTemplate.from_dict(saved["chat_template"])
    if saved["kind"] == SentencePieceTokenizer.kind:
        model_file = path / "tokenizer.model"
        proto = model_file.read_bytes()
        # SentencePiece raises RuntimeError for bytes it cannot parse; an empty file it does not
        # refuse at all (it logs errors, then fails later), so that one is checked here.
        if proto:
            try:
                return SentencePieceTokenizer(proto, template)
            except RuntimeError:
                pass
        raise ValueError(f"{model_file}: not a SentencePiece model "
                         f"({'empty' if not proto else 'truncated or damaged'})")
    if saved["kind"] == HFTokenizer.kind:
        backend = read_tokenizer_json(path / "tokenizer.json")
        return HFTokenizer(backend, template, pad_token=saved["pad_token"],
                           bos_token=saved["bos_token"], eos_token=saved["eos_token"])
    raise ValueError(f"{config_file}: minivlm.kind is {saved['kind']!r}; "
                     f"expected 'sentencepiece' or 'hf'")
