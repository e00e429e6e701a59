"""The Hugging Face backend: a `tokenizers.Tokenizer` (from a tokenizer.json, or built from GGUF
metadata in `minivlm.weights.gguf_tokenizer`) behind minivlm's `Tokenizer` interface."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import tokenizers

from minivlm.constants import IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.chat_template import MINIVLM, ChatTemplate, get_chat_template, template_from_jinja
from minivlm.data.tokenizer import CONFIG_FILE, Tokenizer
from minivlm.files import atomic_path


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`; it already splits on its added tokens itself."""

    kind = "hf"
    hf_tokenizer_class = "PreTrainedTokenizerFast"  # what loads a bare tokenizer.json

    def __init__(self, backend: tokenizers.Tokenizer, template: ChatTemplate, *, pad_token: str,
                 bos_token: str | None, eos_token: str, num_added_tokens: int = 0):
        self.backend = backend
        super().__init__(template, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token,
                         num_added_tokens=num_added_tokens)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._skipped_ids = {i for i, token in added.items() if token.special}
        self._skipped_ids |= {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}
        self._skipped_ids -= {self.image_token_id, self.seg_token_id}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        # Larger than every id even if the added tokens leave a gap after the model's vocabulary.
        added_ids = self.backend.get_added_tokens_decoder().keys()
        return max(self.backend.get_vocab_size(with_added_tokens=True),
                   max(added_ids, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; the chat template frames the text.
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self.backend.decode(ids, skip_special_tokens=False)

    def _save_files(self, out_dir: Path) -> list[str]:
        with atomic_path(out_dir / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        return ["tokenizer.json"]


def wrap_tokenizers(backend: tokenizers.Tokenizer, *, eos_token: str | None = None,
                    bos_token: str | None = None, pad_token: str | None = None,
                    chat_template: str | ChatTemplate | None = None,
                    jinja: str | None = None) -> HFTokenizer:
    """Wrap a `tokenizers.Tokenizer` (from tokenizer.json or built from GGUF metadata), adding
    "<image>", "[SEG]" and the template's markers as special tokens where missing.

    The template is `chat_template` (a name or a ChatTemplate) if given, else the one recognised
    in the model's Jinja `jinja` (ChatML), else "minivlm". EOS defaults to the template's
    end-of-turn marker and padding to EOS (padded positions are masked anyway).
    """
    if isinstance(chat_template, str):
        chat_template = get_chat_template(chat_template)
    template = chat_template or template_from_jinja(jinja) or MINIVLM
    # Only added tokens are matched whole in text; a plain vocabulary entry "<image>" would still
    # be split by the pre-tokenizer, so it counts as missing (adding it reuses its id).
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [t for t in (IMAGE_TOKEN, SEG_TOKEN, *template.special_tokens) if t not in present]
    num_added = backend.add_special_tokens(
        [tokenizers.AddedToken(token, special=True, normalized=False) for token in missing])
    eos_token = eos_token or template.end_of_turn
    return HFTokenizer(backend, template, pad_token=pad_token or eos_token, bos_token=bos_token,
                       eos_token=eos_token, num_added_tokens=num_added)


def read_tokenizer_json(file: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust library raises a bare Exception for any bad file
        raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({error})") from None


def load_hf_tokenizer(path: str | Path, chat_template: str | ChatTemplate | None = None
                      ) -> HFTokenizer:
    """A Hugging Face tokenizer.json (or a directory holding it and tokenizer_config.json)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: not found; expected a Hugging Face tokenizer.json "
                         f"or a directory holding one")
    config: dict = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):  # the second wins, as in transformers
        if (file.parent / name).is_file():
            config.update(json.loads((file.parent / name).read_text()))
    jinja = config.get("chat_template")
    if isinstance(jinja, list):  # [{"name": "default", "template": ...}, ...]
        jinja = next((t["template"] for t in jinja if t.get("name") == "default"), None)
    if (file.parent / "chat_template.jinja").is_file():  # where transformers 5 saves it
        jinja = (file.parent / "chat_template.jinja").read_text()

    def token(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return wrap_tokenizers(read_tokenizer_json(file), eos_token=token("eos_token"),
                           bos_token=token("bos_token"), pad_token=token("pad_token"),
                           chat_template=chat_template, jinja=jinja)
