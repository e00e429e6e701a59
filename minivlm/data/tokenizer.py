"""The tokenizer interface every backend implements: special ids, `encode_chat`, saving.

minivlm has one tokenizer interface (`Tokenizer`, here) over two backends: a SentencePiece BPE
(sentencepiece_tokenizer.py) and a Hugging Face `tokenizers.Tokenizer` (hf_tokenizer.py: from a
tokenizer.json, or built from GGUF metadata).

What the VLM relies on: `encode`/`decode`; "<image>", "[SEG]" and the chat template's markers are
each exactly one id; `encode_chat` returns ids and labels (-100 except what the assistant says).

How a chat is tokenised (both backends, one code path in `Tokenizer.encode_chat`): the template
renders the whole conversation to one string, that string is encoded once, and a token is trained
when its first character lies in an assistant span (content + end-of-turn marker). The ids are
therefore exactly those of encoding the rendered text, i.e. what inference and transformers'
apply_chat_template produce. For the "minivlm" template every span boundary is a special token, so
encoding turn by turn gives the same ids; for ChatML the prefix "assistant\\n" and the answer share
one piece of text, which GPT-2-style pre-tokenizers split at the newline (a test checks this).

Where each part lives: the chat templates in `chat_template.py`; here, the interface and what
both backends share (special ids, `encode_chat`, `save`); the backends in
`sentencepiece_tokenizer.py` (with its trainer) and `hf_tokenizer.py`; `load_tokenizer.py` opens
whatever `save` wrote.

Saved layout: tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) plus
tokenizer_config.json, whose "minivlm" section names the kind, files, special tokens and the chat
template; the Hugging Face keys beside it let transformers load an "hf" directory as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from minivlm.constants import IGNORE_INDEX, IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.chat_template import ChatTemplate
from minivlm.files import write_json_atomic

CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """Special ids, chat encoding and saving, shared by both backends. A backend sets `kind` and
    supplies token_to_id, vocab_size, encode, encode_with_offsets, decode and _save_files."""

    kind = ""
    # transformers' class for the saved files, written to tokenizer_config.json when it has one.
    hf_tokenizer_class: str | None = None

    def __init__(self, template: ChatTemplate, *, pad_token: str, bos_token: str | None,
                 eos_token: str, num_added_tokens: int = 0):
        self.template = template
        self.pad_token, self.bos_token, self.eos_token = pad_token, bos_token, eos_token
        self.num_added_tokens = num_added_tokens  # new rows the model's embeddings need
        self.pad_id = self._single_id(pad_token, "the padding token")
        self.bos_id = self._single_id(bos_token, "the BOS token") if bos_token else None
        self.eos_id = self._single_id(eos_token, "the EOS token")
        self.image_token_id = self._single_id(IMAGE_TOKEN, "images")
        self.seg_token_id = self._single_id(SEG_TOKEN, "segmentation")
        # Markers matched in raw text and mapped to one id each.
        self.special_token_ids = {token: self._single_id(token, f"chat template {template.name!r}")
                                  for token in (IMAGE_TOKEN, SEG_TOKEN, *template.special_tokens)}
        end_of_turn_id = self._single_id(template.end_of_turn, f"chat template {template.name!r}")
        self.stop_token_ids = list(dict.fromkeys([end_of_turn_id, self.eos_id]))

    def _single_id(self, token: str, needed_for: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.kind} tokenizer has no single id for {token!r} "
                             f"(needed for {needed_for})")
        return token_id

    # ---- chat ----
    def render_chat(self, turns: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(turns, add_generation_prompt)

    def encode_chat(self, turns: list[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """(ids, labels) with labels aligned to ids (the model shifts them): the id where the
        token starts inside an assistant turn's content or its end-of-turn marker, else -100."""
        text, trained_spans = self.template.render_spans(turns, add_generation_prompt)
        ids, starts = self.encode_with_offsets(text)
        trained = [False] * (len(text) + 1)
        for start, end in trained_spans:
            trained[start:end] = [True] * (end - start)
        labels = [token_id if trained[start] else IGNORE_INDEX
                  for token_id, start in zip(ids, starts)]
        return ids, labels

    # ---- saving ----
    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = self._save_files(out_dir)
        config = {
            "minivlm": {"kind": self.kind, "files": files, "chat_template": self.template.to_dict(),
                        "pad_token": self.pad_token, "bos_token": self.bos_token,
                        "eos_token": self.eos_token},
            # Hugging Face's keys, so transformers renders chats as we do.
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "chat_template": self.template.to_jinja(),
        }
        if self.hf_tokenizer_class:
            config["tokenizer_class"] = self.hf_tokenizer_class
        write_json_atomic(out_dir / CONFIG_FILE, config)

    # ---- backend hooks ----
    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and, for each, the index of the character in `text` where its token starts."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. skip_special drops control tokens (pad, BOS, EOS, chat markers) but
        keeps "<image>" and "[SEG]", which are part of the data's text."""
        raise NotImplementedError

    def _save_files(self, out_dir: Path) -> list[str]:
        raise NotImplementedError
