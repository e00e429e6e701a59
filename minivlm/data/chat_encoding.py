"""A conversation into ids and labels: chat templates, and the Tokenizer interface applying them.

A chat template decides how a conversation becomes one string, and which characters the model
learns.

A template here is data (role prefixes and an end-of-turn marker), not a Jinja program, so that
`Tokenizer.encode_chat` knows exactly which characters are assistant answers and can mask the rest
of the labels. `to_jinja()` writes the same template as Jinja for Hugging Face's
`apply_chat_template`, and a test checks that both render identically.

    minivlm: <|user|>What colour is it?<|end|><|assistant|>Red.<|end|>
    chatml:  <|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n

The model is trained on each assistant turn's content and its end-of-turn marker (so it learns to
stop); role prefixes, system and user turns, and the text after the marker are masked.

`Tokenizer` (below the templates) is the interface every backend implements (SentencePiece in
tokenizer.py, Hugging Face `tokenizers` in hf_tokenizer.py): one id per special marker,
`encode_chat` with assistant-only labels, and saving.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

from minivlm.constants import IGNORE_INDEX, IMAGE_TOKEN, ROLES, SEG_TOKEN
from minivlm.files import write_json_atomic


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefixes: dict[str, str]       # role -> text opening a turn of that role
    end_of_turn: str                    # closes every turn; a stop token at inference
    after_turn: str = ""                # text after end_of_turn (ChatML's "\n"), never trained
    default_system_prompt: str | None = None  # inserted when the conversation has no system turn
    special_tokens: tuple[str, ...] = ()      # markers that must each be exactly one token id

    @property
    def generation_prompt(self) -> str:
        """Appended to a prompt at inference so the model answers as the assistant."""
        return self.role_prefixes["assistant"]

    def render_spans(self, turns: list[dict], add_generation_prompt: bool = False
                     ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) the model is trained
        on: each assistant turn's content plus its end-of-turn marker."""
        turns = _check_turns(turns)
        # Same condition as SmolLM2's Jinja template: only a non-empty conversation gets one.
        if self.default_system_prompt is not None and turns and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.default_system_prompt}] + turns
        parts: list[str] = []
        trained_spans: list[tuple[int, int]] = []
        position = 0
        for turn in turns:
            prefix = self.role_prefixes[turn["role"]]
            body = turn["content"] + self.end_of_turn
            if turn["role"] == "assistant":
                start = position + len(prefix)
                trained_spans.append((start, start + len(body)))
            parts += [prefix, body, self.after_turn]
            position += len(prefix) + len(body) + len(self.after_turn)
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts), trained_spans

    def render(self, turns: list[dict], add_generation_prompt: bool = False) -> str:
        return self.render_spans(turns, add_generation_prompt)[0]

    def to_jinja(self) -> str:
        """This template as a Jinja string for tokenizer_config.json, so that transformers'
        apply_chat_template renders what `render` does. JSON string literals are valid Jinja."""
        def literal(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)

        close = literal(self.end_of_turn + self.after_turn)
        default_system = ""
        if self.default_system_prompt is not None:
            default_system = (
                "{%- if loop.first and messages[0]['role'] != 'system' %}{{- "
                + literal(self.role_prefixes["system"] + self.default_system_prompt
                          + self.end_of_turn + self.after_turn)
                + " }}{%- endif %}")
        return ("{%- set prefixes = " + json.dumps(self.role_prefixes, ensure_ascii=False) + " %}"
                "{%- for message in messages %}" + default_system
                + "{{- prefixes[message['role']] + message['content'] + " + close + " }}"
                "{%- endfor %}"
                "{%- if add_generation_prompt %}{{- " + literal(self.generation_prompt)
                + " }}{%- endif %}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatTemplate:
        return cls(**{**data, "special_tokens": tuple(data.get("special_tokens", ()))})


MINIVLM = ChatTemplate(
    # Short markers: every token of a prompt costs CPU time in the synthetic-world runs.
    name="minivlm",
    role_prefixes={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
    end_of_turn="<|end|>",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
)
CHATML = ChatTemplate(
    # As SmolLM2 and Qwen2 write it; their tokenizers already hold both markers.
    name="chatml",
    role_prefixes={role: f"<|im_start|>{role}\n" for role in ROLES},
    end_of_turn="<|im_end|>",
    after_turn="\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
)
CHAT_TEMPLATES = {template.name: template for template in (MINIVLM, CHATML)}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; "
                         f"expected one of {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def template_from_jinja(jinja: str | None) -> ChatTemplate | None:
    """Recognise a Hugging Face Jinja chat template we can represent, else None.

    Only ChatML is recognised (by its "<|im_start|>" marker). A hard-coded default system prompt,
    as SmolLM2 and Qwen2.5 have, is taken from the first "<|im_start|>system\\n...<|im_end|>"
    literal free of quotes, braces and escapes; the newline may be written as \\n or raw.
    """
    if not jinja or "<|im_start|>" not in jinja:
        return None
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}\\]+?)<\|im_end\|>", jinja)
    return replace(CHATML, default_system_prompt=found.group(1) if found else None)


def _check_turns(turns: list[dict]) -> list[dict]:
    for index, turn in enumerate(turns):
        if (not isinstance(turn, dict) or turn.get("role") not in ROLES
                or not isinstance(turn.get("content"), str)):
            raise ValueError(f"chat turn {index}: expected {{'role': one of {ROLES}, "
                             f"'content': str}}, got {turn!r:.120}")
    return list(turns)


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
