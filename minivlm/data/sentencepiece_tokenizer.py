"""The SentencePiece backend of the `Tokenizer` interface (tokenizer.py), and its trainer.

`train_sentencepiece` trains a BPE model on the data's texts with every special marker (<image>,
[SEG], the chat template's) as a user-defined symbol, and saves it with the template
(tokenizer.model + tokenizer_config.json); `load_tokenizer` (load_tokenizer.py) opens it again.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from minivlm.constants import IMAGE_TOKEN, SEG_TOKEN
from minivlm.data.chat_template import ChatTemplate, get_chat_template
from minivlm.data.tokenizer import Tokenizer
from minivlm.files import atomic_path


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
        with atomic_path(out_dir / "tokenizer.model") as tmp:
            tmp.write_bytes(self.model_proto)
        return ["tokenizer.model"]


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
        too_high = re.search(r"Vocabulary size too high \((\d+)\)\. "
                             r"Please set it to a value <= (\d+)", str(error))
        if too_high:
            raise ValueError(
                f"train_sentencepiece: vocab_size={too_high[1]} is more than this corpus supports "
                f"(at most {too_high[2]}, counting {4 + len(markers)} special and 256 byte "
                f"pieces); lower vocab_size or give more text") from None
        too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)",
                            str(error))
        if too_low:
            raise ValueError(
                f"train_sentencepiece: vocab_size={too_low[1]} is too small: this corpus needs at "
                f"least {too_low[2]} pieces for its characters, byte fallback and special tokens; "
                f"raise vocab_size") from None
        if "sentences_.empty()" in str(error):
            raise ValueError("train_sentencepiece: the corpus is empty "
                             "(no non-empty texts)") from None
        raise
    tokenizer = SentencePieceTokenizer(model.getvalue(), template)
    tokenizer.save(out_dir)
    return tokenizer
