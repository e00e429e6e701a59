"""One --data entry into a ChatDataset: from its cached index, or read, checked and tokenised.

    --data entry ─► record_index: an entry for this file, tokenizer and sizes? ─► memory-map it
                 └► readers.iter_dataset (one record at a time) ─► ChatDataset (record_encoder)
                    ─► saved as the index for the next run (JSON / JSONL files)
The dataset comes back without images decoded: the stage then fills the frozen encoders' caches
and, with --preload-images, decodes them (ChatDataset.prepare_images).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minivlm.data.batch import ChatDataset
from minivlm.data.images import MAX_IMAGE_PIXELS
from minivlm.data.readers import iter_dataset, split_kind
from minivlm.data.reasonseg import iter_expanded_texts
from minivlm.data.record_index import (INDEX_MIN_BYTES, index_key, indexable, load_index,
                                       save_index, tokenizer_fingerprint)
from minivlm.data.seg_data_config import SegDataConfig


@dataclass
class DataOptions:
    """How the stage reads its --data entries (TrainConfig's data flags, resolved)."""

    image_dir: str | None = None
    seg_data: SegDataConfig | None = None
    expand_texts: bool = False  # a ReasonSeg sample becomes one example per referring text
    skip_bad: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    tokenize_workers: int = 0
    index_root: Path | None = None  # None: no index is read or written
    index_min_bytes: int = INDEX_MIN_BYTES
    hf_columns: str = ""  # a Hugging Face dataset's column mapping (hf_datasets.parse_columns)


def index_settings(tokenizer, image_processor, tokens_per_tile: int, max_seq_len: int,
                   options: DataOptions, fingerprint: str | None = None) -> dict:
    """What a file's records depend on besides the file (record_index.index_key)."""
    return {"image_dir": str(Path(options.image_dir).resolve()) if options.image_dir else None,
            "tokenizer": fingerprint or tokenizer_fingerprint(tokenizer),
            "max_seq_len": max_seq_len, "tokens_per_tile": tokens_per_tile,
            "image_size": image_processor.image_size, "max_tiles": image_processor.max_tiles,
            "max_image_pixels": options.max_image_pixels, "expand_texts": options.expand_texts}


def uses_index(path: str, options: DataOptions) -> bool:
    """Whether `path` is read through an index (a JSON / JSONL file, large enough)."""
    kind, file = split_kind(path)
    return (options.index_root is not None and kind is None
            and indexable(file, options.index_min_bytes))


def load_chat_dataset(path: str, tokenizer, image_processor, tokens_per_tile: int,
                      max_seq_len: int, options: DataOptions,
                      settings: dict | None = None) -> tuple[ChatDataset, str]:
    """(the dataset, where it came from: "read", "read and indexed in DIR", "index DIR").
    Its `errors` are every bad record's one-line message (the reader's and the encoder's),
    kept only under skip_bad: otherwise the first one raises."""
    folder = None
    if uses_index(path, options):
        file = split_kind(path)[1]
        settings = settings or index_settings(tokenizer, image_processor, tokens_per_tile,
                                              max_seq_len, options)
        key = index_key(file, settings)
        folder = options.index_root / key[:2] / key
        found = load_index(folder)
        if found is not None:
            store, errors = found
            if errors and not options.skip_bad:
                raise ValueError(errors[0])
            return ChatDataset(store, tokenizer, image_processor, tokens_per_tile, max_seq_len,
                               skip_bad=options.skip_bad, max_image_pixels=options.max_image_pixels,
                               errors=errors), f"index {folder}"
    reader_errors: list[str] | None = [] if options.skip_bad else None
    samples = iter_dataset(path, options.image_dir, errors=reader_errors,
                           seg_data=options.seg_data, columns=options.hf_columns or None)
    if options.expand_texts:
        samples = iter_expanded_texts(samples)
    dataset = ChatDataset(samples, tokenizer, image_processor, tokens_per_tile, max_seq_len,
                          skip_bad=options.skip_bad, max_image_pixels=options.max_image_pixels,
                          tokenize_workers=options.tokenize_workers)
    # the reader's errors come first in skipped.jsonl, as before the records were streamed
    dataset.errors = (reader_errors or []) + dataset.errors
    if folder is not None and save_index(folder, dataset.records, dataset.errors):
        return dataset, f"read and indexed in {folder}"
    return dataset, "read"
