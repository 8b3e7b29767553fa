"""The pretraining stream: slices from shard folders, balanced across modalities, resumable.

Each modality's shards form one stream; the next sample comes from a modality drawn with weight
``count ** alpha`` (alpha 0: equal, 1: as in the data; 0.5 by default). Every (rank, worker) reads a
disjoint share: whole shards when there are enough, else every G-th sample of each shard.

The stream position is a pure function of the global step: :meth:`PretrainStream.at_step` sets it
before the data-loader workers start, so a run resumed from a checkpoint continues on the data it
would have seen (it re-reads, without augmenting, the part of the epoch already done).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medfound.data.augment import pretrain_augment
from medfound.data.shards import rank_and_world, read_manifest


def modality_weights(counts: dict[str, int], alpha: float) -> dict[str, float]:
    w = {m: float(n) ** alpha for m, n in counts.items() if n > 0}
    total = sum(w.values())
    return {m: v / total for m, v in sorted(w.items())}


class PretrainStream(IterableDataset):
    """Yields ``(image (1, S, S) float32, modality index)`` for one epoch of ``samples_per_epoch``."""

    def __init__(self, folders: list[str | os.PathLike], image_size: int, batch_size: int,
                 num_workers: int = 0, alpha: float = 0.5, seed: int = 0, samples_per_epoch: int | None = None,
                 augment: bool = True, rank: int | None = None, world: int | None = None):
        self.image_size, self.batch_size, self.seed, self.augment = image_size, batch_size, seed, augment
        self.num_workers = max(num_workers, 0)
        self.shards: dict[str, list[tuple[str, int]]] = {}
        for folder in folders:
            m = read_manifest(folder)
            for s in m["shards"]:
                mod = s.get("modality") or "mixed"
                self.shards.setdefault(mod, []).append((str(Path(folder) / "shards" / s["file"]), int(s["count"])))
        self.counts = {m: sum(c for _, c in v) for m, v in self.shards.items()}
        self.modalities = sorted(self.counts)
        self.weights = modality_weights(self.counts, alpha)
        self.rank, self.world = (rank, world) if rank is not None and world is not None else rank_and_world()
        total = sum(self.counts.values())
        self.samples_per_epoch = samples_per_epoch or total
        G = self.world * max(self.num_workers, 1)
        # Samples per (rank, worker) per epoch: whole batches, equal everywhere (DDP needs equal steps).
        self.per_worker = max(1, self.samples_per_epoch // G // batch_size) * batch_size
        self.steps_per_epoch = self.per_worker // batch_size * max(self.num_workers, 1)
        self.step = 0

    def at_step(self, global_step: int) -> None:
        self.step = int(global_step)

    def __len__(self) -> int:
        """Samples per epoch on this rank (the DataLoader divides by the batch size)."""
        return self.per_worker * max(self.num_workers, 1)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard_stream(self, mod: str, g: int, G: int, rng: np.random.Generator) -> Iterator[torch.Tensor] | None:
        """Endless slices of one modality for worker ``g`` of ``G``; None if its share is empty."""
        shards = self.shards[mod]
        if len(shards) >= G:
            mine, stride = shards[g::G], None
        else:
            mine, stride = shards, (g, G)
            if sum(c for _, c in shards) <= g:
                return None

        def gen():
            while True:
                order = rng.permutation(len(mine))
                for k in order:
                    yield from _read_tar(mine[k][0], stride)

        return gen()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        wid, nw = self._worker()
        g, G = self.rank * nw + wid, self.world * nw
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        done = (in_epoch // nw + (1 if wid < in_epoch % nw else 0)) * self.batch_size
        rng = np.random.default_rng([self.seed, epoch, g])
        streams = {m: self._shard_stream(m, g, G, rng) for m in self.modalities}
        live = [m for m in self.modalities if streams[m] is not None]
        if not live:  # a worker with no share at all re-reads the whole pool rather than stall DDP
            streams = {m: self._shard_stream(m, 0, 1, rng) for m in self.modalities}
            live = self.modalities
        p = np.array([self.weights[m] for m in live])
        p = p / p.sum()
        for i in range(self.per_worker):
            mod = live[int(rng.choice(len(live), p=p))]
            x = next(streams[mod])
            if i < done:
                continue
            if self.augment:
                x = pretrain_augment(x, self.image_size, np.random.default_rng([self.seed, epoch, g, i]))
            elif x.shape[-1] != self.image_size:
                x = torch.nn.functional.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear")[0]
            yield x, self.modalities.index(mod)


def _read_tar(path: str, stride: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    import webdataset as wds

    ds = wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for i, sample in enumerate(ds):
        if stride is None or i % stride[1] == stride[0]:
            yield torch.from_numpy(np.load(io.BytesIO(sample["npy"])).astype(np.float32))[None]


class StepAwareLoader(DataLoader):
    """A DataLoader that tells its :class:`PretrainStream` the global step before workers start,
    so each epoch (and each resume) starts where the previous run of the stream left off."""

    def __init__(self, dataset: PretrainStream, step_fn, **kwargs):
        super().__init__(dataset, **kwargs)
        self._step_fn = step_fn

    def __iter__(self):
        self.dataset.at_step(self._step_fn())
        return super().__iter__()


def preview_slices(folders: list[str | os.PathLike], per_modality: int = 2) -> dict[str, torch.Tensor]:
    """A few fixed slices per modality (the first ones of its middle shard) for reconstruction grids."""
    out: dict[str, list[torch.Tensor]] = {}
    for folder in folders:
        m = read_manifest(folder)
        by_mod: dict[str, list[str]] = {}
        for s in m["shards"]:
            by_mod.setdefault(s.get("modality") or "mixed", []).append(str(Path(folder) / "shards" / s["file"]))
        for mod, files in by_mod.items():
            if len(out.get(mod, [])) >= per_modality:
                continue
            items = list(_read_tar(files[len(files) // 2], None))
            pick = np.linspace(0, len(items) - 1, per_modality).round().astype(int)
            out.setdefault(mod, []).extend(items[i] for i in pick)
    return {k: torch.stack(v[:per_modality]) for k, v in sorted(out.items())}
