"""One tokenizer interface over two backends: a SentencePiece BPE trained here, and a Hugging Face
`tokenizers.Tokenizer` (from a tokenizer.json, or, later, built from GGUF metadata).

What the VLM relies on: `encode`/`decode`; "<image>", "[SEG]" and the chat template's markers are
each exactly one id; `encode_chat` returns ids and labels (-100 except what the assistant says).

How a chat is tokenised (both backends, one code path in `Tokenizer.encode_chat`): the template
renders the whole conversation to one string, that string is encoded once, and a token is trained
when its first character lies in an assistant span (content + end-of-turn marker). The ids are
therefore exactly those of encoding the rendered text, i.e. what inference and transformers'
apply_chat_template produce. For the "minivlm" template every span boundary is a special token, so
encoding turn by turn gives the same ids; for ChatML the prefix "assistant\\n" and the answer share
one piece of text, which GPT-2-style pre-tokenizers split at the newline (a test checks this).

Saved layout: tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) plus
tokenizer_config.json, whose "minivlm" section names the kind, files, special tokens and the chat
template; the Hugging Face keys beside it let transformers load an "hf" directory as it is.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import tokenizers

from minivlm.constants import IGNORE_INDEX, IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.chat_template import MINIVLM, ChatTemplate, get_chat_template, template_from_jinja

CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """Special ids, chat encoding and saving, shared by both backends. A backend sets `kind` and
    supplies token_to_id, vocab_size, encode, encode_with_offsets, decode and _save_files."""

    kind = ""

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
        labels = [token_id if trained[start] else IGNORE_INDEX for token_id, start in zip(ids, starts)]
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
        if self.kind == HFTokenizer.kind:
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

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


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained by `train_sentencepiece`.

    Text is first split on the special markers with a regex; only the plain pieces go through
    SentencePiece and each marker becomes its id directly. SentencePiece alone would not give one
    id per marker in every context (with a dummy prefix "<image>" becomes "▁" + "<image>").
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, template: ChatTemplate):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        super().__init__(template, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        markers = sorted(self.special_token_ids, key=len, reverse=True)  # longest match first
        self._marker_pattern = re.compile("(" + "|".join(map(re.escape, markers)) + ")")
        self._special_text = {i: self.sp.id_to_piece(i)
                              for i in (self.pad_id, self.bos_id, self.eos_id)}
        self._special_text.update({i: token for token, i in self.special_token_ids.items()})
        self._kept_special_ids = {self.image_token_id, self.seg_token_id}

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != "<unk>" else token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, chunk in enumerate(self._marker_pattern.split(text)):
            if index % 2:  # re.split puts the captured markers at odd positions
                ids.append(self.special_token_ids[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        position = 0
        for index, chunk in enumerate(self._marker_pattern.split(text)):
            if index % 2:
                ids.append(self.special_token_ids[chunk])
                starts.append(position)
            elif chunk:
                # SentencePiece reports UTF-8 byte offsets; map them back to characters.
                char_of_byte = [c for c, char in enumerate(chunk) for _ in char.encode()]
                char_of_byte.append(len(chunk))
                for piece in self.sp.encode(chunk, out_type="proto").pieces:
                    ids.append(piece.id)
                    starts.append(position + char_of_byte[piece.begin])
            position += len(chunk)
        return ids, starts

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in map(int, ids):
            token = self._special_text.get(token_id)
            if token is None:
                run.append(token_id)
                continue
            # add_dummy_prefix=False, so decoding a run never drops its leading space.
            parts.append(self.sp.decode(run))
            run = []
            if not skip_special or token_id in self._kept_special_ids:
                parts.append(token)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def _save_files(self, out_dir: Path) -> list[str]:
        (out_dir / "tokenizer.model").write_bytes(self.model_proto)
        return ["tokenizer.model"]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`; it already splits on its added tokens itself."""

    kind = "hf"

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
        return max(self.backend.get_vocab_size(with_added_tokens=True), max(added_ids, default=-1) + 1)

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
        self.backend.save(str(out_dir / "tokenizer.json"))
        return ["tokenizer.json"]


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, *,
                        template: str | ChatTemplate = "minivlm", num_threads: int = 2,
                        **trainer_options) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE on `texts` (one sentence or document each), save it to `out_dir`.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, [SEG]=5, then the template's markers.
    `trainer_options` override SentencePiece trainer flags (e.g. input_sentence_size=...).
    """
    template = get_chat_template(template) if isinstance(template, str) else template
    markers = [IMAGE_TOKEN, SEG_TOKEN, *template.special_tokens]
    options = dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=markers,
        # Exact round trips: no Unicode normalisation, keep repeated spaces, and no dummy "▁"
        # before each text (it would also appear before every chunk between markers).
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True,  # counts are single digits the model must tell apart
        max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2)
    options.update(trainer_options)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, **options)
    except RuntimeError as error:
        too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                             str(error))
        if too_high:
            raise ValueError(
                f"train_sentencepiece: vocab_size={too_high[1]} is more than this corpus supports "
                f"(at most {too_high[2]}, counting {4 + len(markers)} special and 256 byte pieces); "
                f"lower vocab_size or give more text") from None
        too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)",
                            str(error))
        if too_low:
            raise ValueError(
                f"train_sentencepiece: vocab_size={too_low[1]} is too small: this corpus needs at "
                f"least {too_low[2]} pieces for its characters, byte fallback and special tokens; "
                f"raise vocab_size") from None
        if "sentences_.empty()" in str(error):
            raise ValueError("train_sentencepiece: the corpus is empty (no non-empty texts)") from None
        raise
    tokenizer = SentencePieceTokenizer(model.getvalue(), template)
    tokenizer.save(out_dir)
    return tokenizer


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

    return wrap_tokenizers(tokenizers.Tokenizer.from_file(str(file)), eos_token=token("eos_token"),
                           bos_token=token("bos_token"), pad_token=token("pad_token"),
                           chat_template=chat_template, jinja=jinja)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """What `Tokenizer.save` wrote; a plain Hugging Face tokenizer directory also works."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    saved = config.get("minivlm")
    if saved is None:
        if (path / "tokenizer.json").is_file():
            return load_hf_tokenizer(path)
        raise ValueError(f"{config_file}: no 'minivlm' section and no tokenizer.json beside it; "
                         f"expected a directory written by Tokenizer.save")
    template = ChatTemplate.from_dict(saved["chat_template"])
    if saved["kind"] == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer((path / "tokenizer.model").read_bytes(), template)
    if saved["kind"] == HFTokenizer.kind:
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        return HFTokenizer(backend, template, pad_token=saved["pad_token"],
                           bos_token=saved["bos_token"], eos_token=saved["eos_token"])
    raise ValueError(f"{config_file}: minivlm.kind is {saved['kind']!r}; "
                     f"expected 'sentencepiece' or 'hf'")
