"""Shards streamed as Samples: split over DDP ranks and DataLoader workers, resumable exactly.

A shard is one file: a WebDataset .tar (tar_shards.py), or a parquet or .arrow file of a Hugging
Face dataset (hf_datasets.py). Sharded data is never loaded whole: each reader opens one shard at
a time and yields its samples in file order.

    readers     R = world_size x max(num_workers, 1); reader r = rank x workers + worker id
    epoch e     the shard order is a permutation seeded by seed + e (as DistributedSampler),
                and reader r reads order[r], order[r + R], order[r + 2R], ...: every shard once
                an epoch, by one reader, so no sample is read twice in an epoch
    position    per reader: (epoch, shard, index), the next sample to read. Every sample carries
                the position after it in meta["stream_position"]; the caller hands back the
                positions of the samples it has used (`mark_consumed`), and `state_dict` is then
                where a resumed run continues: the samples not yet used, then the same epochs
Fewer shards than readers is refused (one line), not split by sample index: that would make
every reader read every shard. Write more shards (shapes/export.py --shard-size) or use fewer
workers. Shards of unequal size give readers unequal epochs; with `epochs=None` (endless, the
default) a trainer stops by step count, and no rank runs out before another.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from minivlm.data.hf_datasets import file_samples, hf_files
from minivlm.data.sample import Sample
from minivlm.data.tar_shards import tar_samples

SHARD_SUFFIXES = (".tar", ".parquet", ".arrow")
POSITION_KEY = "stream_position"  # the Sample.meta key of the position after that sample
BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """"shards-{0000..0002}.tar" -> shards-0000.tar, shards-0001.tar, shards-0002.tar; also
    "{a,b}" lists and several braces (bash's rules: a range keeps the width of its first end)."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    if (numbers := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        first, last = numbers.group(1), numbers.group(2)
        step = 1 if int(last) >= int(first) else -1
        items = [f"{n:0{len(first)}d}" for n in range(int(first), int(last) + step, step)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def list_shards(source: str | Path | Iterable) -> list[Path]:
    """The shard files a source names: a file, a brace pattern, a list of them, a folder of .tar
    files, or a Hugging Face dataset folder (hf_datasets.hf_files). Each must exist."""
    if not isinstance(source, (str, Path)):
        return [shard for item in source for shard in list_shards(item)]
    if BRACES.search(str(source)):
        return [shard for name in expand_braces(str(source)) for shard in list_shards(name)]
    path = Path(source)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        return tars or hf_files(path)
    if path.suffix not in SHARD_SUFFIXES:
        raise ValueError(f"{path}: not a shard (expected {', '.join(SHARD_SUFFIXES)})")
    if not path.is_file():
        raise ValueError(f"{path}: shard not found")
    return [path]


def merge_states(states: Iterable[dict]) -> dict:
    """One state from every rank's `state_dict()` (each holds its own readers' positions)."""
    states = list(states)
    readers = {r: position for state in states for r, position in state["readers"].items()}
    return {**states[0], "readers": dict(sorted(readers.items(), key=lambda kv: int(kv[0])))}


class ShardStream(IterableDataset):
    """This rank's share of the shards' samples, epoch after epoch (see the module docstring).

    `num_workers` must be the DataLoader's. `epochs`: stop before this epoch (None: endless).
    `columns`: the column mapping for parquet/.arrow shards (hf_datasets.parse_columns).
    `skip_bad`: a bad sample is left out, its message added to the next sample's meta["skipped"]
    (across worker processes, with the data); otherwise it raises. A bad shard always raises.
    """

    def __init__(self, shards: str | Path | Iterable, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None, columns: str | dict | None = None,
                 skip_bad: bool = False):
        self.shards = list_shards(shards)
        self.rank, self.num_workers = rank, num_workers
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.columns, self.skip_bad = columns, skip_bad
        self.readers_per_rank = max(num_workers, 1)
        self.num_readers = world_size * self.readers_per_rank
        if len(self.shards) < self.num_readers:
            raise ValueError(
                f"{self.shards[0] if self.shards else shards}: {len(self.shards)} shard(s) for "
                f"{self.num_readers} readers ({world_size} rank(s) x {self.readers_per_rank} "
                "DataLoader worker(s)); write at least one shard per reader, or use fewer workers")
        first = self.readers_per_rank * rank
        self.positions = {r: {"epoch": 0, "shard": self.reader_shards(r, 0)[0], "index": 0}
                          for r in range(first, first + self.readers_per_rank)}
        # The reader DataLoader worker 0 reads. A DataLoader deals batches from its workers in
        # turn, from worker 0; a run resumed after k batches sets k % workers here, so that its
        # batches come from the readers in the turn an uninterrupted run's would.
        self.first_worker = 0

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def reader_shards(self, reader: int, epoch: int) -> list[int]:
        """The shards (indices into self.shards) reader `reader` reads in `epoch`, in order."""
        return self.epoch_order(epoch)[reader::self.num_readers]

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (0, 0)
        if workers != self.num_workers:
            raise ValueError(f"this stream was built for num_workers={self.num_workers} but is "
                             f"read by a DataLoader with num_workers={workers}; give it the same")
        reader = self.rank * self.readers_per_rank + (worker + self.first_worker) % max(workers, 1)
        yield from self._read(reader, dict(self.positions[reader]))

    def _read(self, reader: int, position: dict) -> Iterator[Sample]:
        epoch, skipped = position["epoch"], []
        while self.epochs is None or epoch < self.epochs:
            shards = self.reader_shards(reader, epoch)
            if epoch == position["epoch"]:
                if position["shard"] not in shards:
                    raise ValueError(f"stream position {position} is not one of reader "
                                     f"{reader}'s shards in epoch {epoch}: the state belongs to "
                                     "other shards, seed or reader count")
                slot, start = shards.index(position["shard"]), position["index"]
            else:
                slot, start = 0, 0
            for shard in shards[slot:]:
                for index, sample in self._shard_samples(self.shards[shard], start):
                    if isinstance(sample, ValueError):
                        if not self.skip_bad:
                            raise sample
                        skipped.append(str(sample))
                        continue
                    sample.meta[POSITION_KEY] = {"reader": reader, "epoch": epoch,
                                                 "shard": shard, "index": index + 1}
                    if skipped:
                        sample.meta["skipped"], skipped = skipped, []
                    yield sample
                start = 0
            epoch += 1

    def _shard_samples(self, path: Path, start: int) -> Iterator[tuple[int, Sample | ValueError]]:
        if not path.is_file():  # the constructor checked; a shard can still vanish in a run
            raise ValueError(f"{path}: shard not found")
        if path.suffix == ".tar":
            return tar_samples(path, start)
        return file_samples(path, self.columns, start)

    # ------------------------------------------------------------------ position
    def mark_consumed(self, positions: Iterable[dict]) -> None:
        """Record the samples the caller has used, by their meta["stream_position"]; the last
        position of each reader is where it resumes."""
        for position in positions:
            reader = position["reader"]
            if reader not in self.positions:
                raise ValueError(f"stream position {position}: reader {reader} is not one of "
                                 f"rank {self.rank}'s readers {sorted(self.positions)}")
            self.positions[reader] = {k: position[k] for k in ("epoch", "shard", "index")}

    def state_dict(self) -> dict:
        """This rank's readers' positions, and what they are positions in. JSON-ready; under DDP
        gather every rank's (merge_states) so a checkpoint holds all readers."""
        return {"num_shards": len(self.shards), "num_readers": self.num_readers,
                "seed": self.seed, "shuffle": self.shuffle,
                "readers": {str(r): dict(p) for r, p in self.positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (this rank's or the merged one); call before iterating."""
        mine = {"num_shards": len(self.shards), "num_readers": self.num_readers,
                "seed": self.seed, "shuffle": self.shuffle}
        differences = [f"{k} {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v]
        if differences:
            raise ValueError("cannot resume the stream, it has changed since the state was saved: "
                             + ", ".join(differences))
        for reader in self.positions:
            if str(reader) in state["readers"]:
                self.positions[reader] = dict(state["readers"][str(reader)])


def stream_positions(samples: Iterable[Sample]) -> list[dict]:
    """The positions a batch of stream samples carries, for ShardStream.mark_consumed."""
    return [sample.meta[POSITION_KEY] for sample in samples]
