"""Two gloo processes with two loader workers each read every slice exactly once."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from medfound.data.ingest import IngestOptions, ingest
from medfound.data.phantoms import write_phantom_dataset
from medfound.data.shards import ShardSliceDataset
from medfound.data.sources import Source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dl = DataLoader(ShardSliceDataset(folder), batch_size=None, num_workers=2)
        keys = [meta["key"] for _, meta in dl]
        gathered = [None] * world
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_ranks_no_duplicates(tmp_path):
    ds = write_phantom_dataset(tmp_path / "ph", ("CT", "MR"), cases_per_modality=2)
    m = ingest([Source(ds.root)], tmp_path / "sh", IngestOptions(size=32, shard_size=7), progress=False)
    out = tmp_path / "keys.pt"
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "sh"), str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    all_keys = [k for r in per_rank for k in r]
    assert all(len(r) > 0 for r in per_rank)
    assert len(all_keys) == len(set(all_keys)) == m["num_slices"]
