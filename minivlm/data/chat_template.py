"""Chat templates: how a conversation becomes one string, and which characters the model learns.

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

`Tokenizer.encode_chat` (tokenizer.py) applies a template: it renders the turns with
`render_spans` and labels the tokens whose text lies in an assistant span.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace

from minivlm.constants import ROLES


def check_turns(turns: list[dict]) -> list[dict]:
    for index, turn in enumerate(turns):
        if (not isinstance(turn, dict) or turn.get("role") not in ROLES
                or not isinstance(turn.get("content"), str)):
            raise ValueError(f"chat turn {index}: expected {{'role': one of {ROLES}, "
                             f"'content': str}}, got {turn!r:.120}")
    return list(turns)


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
        turns = check_turns(turns)
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
