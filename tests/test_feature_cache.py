"""The on-disk feature cache (data/feature_cache.py): computed once, served again across epochs and
runs, never stale after the image, the weights or the preprocessing change, written atomically."""
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.data.feature_cache import FeatureCache, module_fingerprint


def write_image(path: Path, value: int) -> Path:
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


class CountingEncoder:
    """An 'encoder' whose output depends on the pixels, counting its calls."""

    def __init__(self, scale: float = 1.0):
        self.calls, self.scale = 0, scale

    def __call__(self, path: Path) -> torch.Tensor:
        self.calls += 1
        pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32))
        return pixels.mean(dim=(0, 1)) * self.scale  # (3,)


def test_second_epoch_and_second_run_hit_the_cache(tmp_path):
    image = write_image(tmp_path / "a.png", 10)
    encoder = CountingEncoder()
    cache = FeatureCache(tmp_path / "cache", "enc v1", encoder)
    first = cache.get(image)
    second = cache.get(image)  # the next epoch
    assert encoder.calls == 1 and (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(first, torch.full((3,), 10.0))
    torch.testing.assert_close(second, first)
    rerun_encoder = CountingEncoder()
    rerun = FeatureCache(tmp_path / "cache", "enc v1", rerun_encoder)  # a new process, same cache
    torch.testing.assert_close(rerun.get(image), first)
    assert rerun_encoder.calls == 0
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # no temporary file left behind


def test_a_changed_image_or_encoder_is_a_miss_never_a_stale_hit(tmp_path):
    image = write_image(tmp_path / "a.png", 10)
    FeatureCache(tmp_path / "cache", "enc v1", CountingEncoder()).get(image)
    write_image(image, 200)  # same path, new pixels
    encoder = CountingEncoder()
    changed = FeatureCache(tmp_path / "cache", "enc v1", encoder).get(image)
    assert encoder.calls == 1
    torch.testing.assert_close(changed, torch.full((3,), 200.0))
    other_weights = CountingEncoder(scale=2.0)  # another checkpoint: another namespace
    other = FeatureCache(tmp_path / "cache", "enc v2", other_weights).get(image)
    assert other_weights.calls == 1
    torch.testing.assert_close(other, torch.full((3,), 400.0))


def test_module_fingerprint_follows_the_weights_not_the_object():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert module_fingerprint(a) != module_fingerprint(b)


def test_a_corrupt_entry_is_named_in_one_line(tmp_path):
    image = write_image(tmp_path / "a.png", 10)
    cache = FeatureCache(tmp_path / "cache", "enc", CountingEncoder())
    entry = cache.ensure(image)
    entry.write_bytes(b"not a tensor")
    with pytest.raises(ValueError, match="unreadable feature-cache entry") as error:
        FeatureCache(tmp_path / "cache", "enc", CountingEncoder()).get(image)
    assert str(entry) in str(error.value) and "\n" not in str(error.value)


def _fill(root: str, paths: list[str]) -> None:
    cache = FeatureCache(root, "enc", CountingEncoder())
    for path in paths:
        cache.get(path)


def test_two_processes_filling_the_same_entries_leave_whole_files(tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", i)) for i in range(20)]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill, args=(str(tmp_path / "cache"), paths))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    encoder = CountingEncoder()
    cache = FeatureCache(tmp_path / "cache", "enc", encoder)
    for i, path in enumerate(paths):
        torch.testing.assert_close(cache.get(path), torch.full((3,), float(i)))
    assert encoder.calls == 0
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_image_bytes_are_keyed_by_their_content(tmp_path):
    """A parquet cell or a tar member has no file: its bytes are the key."""
    image = write_image(tmp_path / "a.png", 10)
    data = image.read_bytes()
    calls = []

    def encode(source):
        calls.append(source)
        return torch.tensor([float(len(source))])

    cache = FeatureCache(tmp_path / "cache", "enc", encode)
    first = cache.get(data)
    assert cache.get(data) is not None and len(calls) == 1 and calls[0] == data
    torch.testing.assert_close(first, torch.tensor([float(len(data))]))
    assert cache.entry(data) == cache.entry(image)  # the same bytes, as a file or in memory
