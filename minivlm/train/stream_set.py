"""Training from a stream of shards (data/shard_stream.py): items made in the loader's workers,
batches that carry their samples' stream positions, the position saved for --resume.

    --data shard-{000000..000003}.tar ─► ShardStream: this rank's readers, one per DataLoader
    worker ─► StreamSet, in the worker: each Sample checked, tokenised and decoded as ChatDataset
    does it ─► batches of --batch-size, each with its samples' positions ─► every batch handed to
    the training loop marks its positions consumed ─► state(): every rank's positions, merged
    (merge_states), saved in trainer_state.json; --resume continues after the last sample trained
A stream has no length and no index, so what needs one is refused in one line (refuse_flags):
--pack and --group-by-length (they order a whole dataset by length), --sample-rates and a stream
beside other --data entries (MixtureDataset draws by index), --preload-images and
--cache-image-features (they go over every image up front). --time-budget works: a stream never
depends on the step count, so the budget's rerun line (--max-steps N) repeats the run exactly.
Under --skip-bad a bad sample is left out, the next one of its reader takes its place, and it is
written to skipped.jsonl; without it, the first one stops training with its one-line error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from torch.utils.data import IterableDataset

from minivlm.data.batch import ChatDataset, collate
from minivlm.data.late_skips import record_late_skip
from minivlm.data.shard_stream import BRACES, POSITION_KEY, ShardStream, merge_states
from minivlm.train.distributed import DistributedEnv

STREAM_KIND = "shards"  # the prefix that names a stream: "shards:PATH"


def stream_source(entry: str) -> str | None:
    """What ShardStream reads for a --data entry that is a stream ("shards:PATH", a .tar file, a
    brace pattern, a folder of .tar files), else None."""
    kind, sep, rest = entry.partition(":")
    if sep and kind == STREAM_KIND:
        return rest
    path = Path(entry)
    if path.suffix == ".tar" or BRACES.search(entry):
        return entry
    return entry if path.is_dir() and any(path.glob("*.tar")) else None


def refuse_flags(train, sample_rates: str, entries: list[str]) -> None:
    """The flags a stream cannot honour, refused in one line each (see the module docstring)."""
    stream = next(e for e in entries if stream_source(e) is not None)
    refused = [("--pack", train.pack), ("--group-by-length", train.group_by_length),
               ("--sample-rates", bool(sample_rates)), ("--preload-images", train.preload_images),
               ("--cache-image-features", train.cache_image_features)]
    for flag, given in refused:
        if given:
            raise ValueError(f"{stream}: {flag} needs a dataset with a length and an index; a "
                             "stream of shards has neither (leave the flag out)")
    if len(entries) > 1:
        raise ValueError(f"{stream}: a stream of shards trains alone; it cannot be mixed with "
                         f"other --data entries ({', '.join(e for e in entries if e != stream)})")


class StreamSet(IterableDataset):
    """A ShardStream's samples as training items (ChatDataset's, made where the loader runs).

    `num_workers` is the DataLoader's: one stream reader per worker. `skip_log`: skipped.jsonl
    (None: no file, the messages go to stderr only)."""

    def __init__(self, stream: ShardStream, tokenizer, image_processor, tokens_per_tile: int,
                 max_seq_len: int, max_image_pixels: int, skip_bad: bool = False,
                 skip_log: Path | None = None, name: str = ""):
        self.stream, self.tokenizer, self.skip_bad = stream, tokenizer, skip_bad
        self.encoding = dict(tokenizer=tokenizer, image_processor=image_processor,
                             tokens_per_tile=tokens_per_tile, max_seq_len=max_seq_len,
                             max_image_pixels=max_image_pixels)
        self.skip_log, self.name = skip_log, name or str(stream.shards[0])

    def __iter__(self) -> Iterator[dict]:
        skipped: list[str] = []
        for sample in self.stream:
            skipped += sample.meta.pop("skipped", [])  # the stream's own (unreadable samples)
            position = sample.meta[POSITION_KEY]
            try:  # one record through ChatDataset: the same checks and the same tensors
                item = ChatDataset([sample], **self.encoding)[0]
            except ValueError as error:
                if not self.skip_bad:
                    raise
                skipped.append(str(error))
                continue
            for message in skipped:
                record_late_skip(self.skip_log, self.name, message, item["source"])
            skipped = []
            yield dict(item, stream_position=position)

    def state(self, env: DistributedEnv) -> dict:
        """Every rank's reader positions, merged (a collective: every rank calls it)."""
        local = self.stream.state_dict()
        if not env.distributed:
            return merge_states([local])
        states = [None] * env.world_size
        dist.all_gather_object(states, local)
        return merge_states(states)

    def resume(self, state: dict | None, ckpt: Path) -> None:
        if state is None:
            raise ValueError(f"{ckpt}: saved without a stream position (a run on a map-style "
                             "dataset); a stream cannot resume it")
        self.stream.load_state_dict(state)


def collate_stream(items: list[dict], pad_id: int) -> dict:
    """collate(), plus the samples' stream positions."""
    return dict(collate(items, pad_id), stream_positions=[i["stream_position"] for i in items])



def load_stream(entry: str, train, columns: str, workers: int, env: DistributedEnv, tokenizer,
                image_processor, tokens_per_tile: int, max_seq_len: int) -> StreamSet:
    """A --data entry that is a stream, for this rank and `workers` loader workers."""
    stream = ShardStream(stream_source(entry), rank=env.rank, world_size=env.world_size,
                         num_workers=workers, seed=train.seed, columns=columns or None,
                         skip_bad=train.skip_bad)
    if env.is_main:
        print(f"data {entry}: a stream of {len(stream.shards)} shard(s), read by "
              f"{env.world_size} x {max(workers, 1)} reader(s)")
    skip_log = Path(train.out_dir) / "skipped.jsonl" if train.skip_bad else None
    return StreamSet(stream, tokenizer, image_processor, tokens_per_tile, max_seq_len,
                     train.max_image_pixels, train.skip_bad, skip_log, entry)
