"""Slice shards: WebDataset tar files of normalised 2D slices, streamed by rank and worker.

A pool of millions of slices cannot sit in memory or in one file; tar shards stream sequentially
from any file system. Each data-loader worker of each rank reads its own subset of shards, so no
slice is seen twice in an epoch across a DDP job.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medfound.errors import InputError
from medfound.io.json_file import read_json


class ShardWriter:
    """Write samples (a float16 slice + JSON metadata) into tar shards of at most ``maxcount``,
    one series of shards per modality (``shard-CT-000000.tar``) so that training can balance
    modalities by choosing which stream to read next."""

    def __init__(self, folder: str | os.PathLike, maxcount: int = 5000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self._writers: dict[str, object] = {}
        self.counts: dict[str, tuple[str, int]] = {}

    def write(self, key: str, slice2d: np.ndarray, meta: dict) -> None:
        import webdataset as wds

        group = str(meta.get("modality", "OT"))
        if group not in self._writers:
            self._writers[group] = wds.ShardWriter(str(self.folder / f"shard-{group}-%06d.tar"),
                                                   maxcount=self.maxcount, verbose=0)
        writer = self._writers[group]
        buf = io.BytesIO()
        np.save(buf, np.asarray(slice2d, dtype=np.float16))
        writer.write({"__key__": key, "npy": buf.getvalue(), "json": json.dumps(meta).encode()})
        name = Path(writer.fname).name
        self.counts[name] = (group, self.counts.get(name, (group, 0))[1] + 1)

    def close(self) -> list[dict]:
        for w in self._writers.values():
            w.close()
        return [{"file": name, "modality": g, "count": n} for name, (g, n) in sorted(self.counts.items())]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (torch.distributed if running, else env vars)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shards_for_this_worker(shards: list[str], rank: int, world: int) -> list[str]:
    """The shards of one (rank, data-loader worker): a strided, disjoint share of the list."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return shards[rank * nw + wid:: world * nw]


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise InputError(folder, "not an ingested shard folder: manifest.json is missing")
    return read_json(path)


class ShardSliceDataset(IterableDataset):
    """Stream ``(slice[1, H, W] float32, meta dict)`` from the shards of an ingested folder.

    ``shuffle`` shuffles shard order per epoch (seeded, same on all ranks) and samples within a
    buffer; call :meth:`set_epoch` each epoch, as with DistributedSampler.
    """

    def __init__(self, folder: str | os.PathLike, shuffle: bool = False, buffer: int = 1000, seed: int = 0):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.shards = [str(self.folder / "shards" / s["file"]) for s in manifest["shards"]]
        self.num_slices = int(manifest["num_slices"])
        self.shuffle, self.buffer, self.seed, self.epoch = shuffle, buffer, seed, 0
        # Data-loader workers are separate processes without the process group: the rank is read
        # here, in the rank's main process (build the dataset after DDP starts, e.g. in setup()).
        self.rank, self.world = rank_and_world()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        import webdataset as wds

        shards = list(self.shards)
        rng = random.Random(self.seed + 1000003 * self.epoch)
        if self.shuffle:
            rng.shuffle(shards)
        mine = shards_for_this_worker(shards, self.rank, self.world)
        if not mine:
            return
        # Splitting is done above, so WebDataset must not split again.
        ds = wds.WebDataset(mine, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        samples = (_decode(s) for s in ds)
        if self.shuffle:
            samples = _shuffle_buffer(samples, self.buffer, rng)
        yield from samples


def _decode(sample: dict) -> tuple[torch.Tensor, dict]:
    arr = np.load(io.BytesIO(sample["npy"]))
    meta = json.loads(sample["json"])
    meta["key"] = sample["__key__"]
    return torch.from_numpy(arr.astype(np.float32))[None], meta


def _shuffle_buffer(it, size: int, rng: random.Random):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf
