"""Ingest of mixed pools (bad files listed, never fatal) and shard streaming by rank and worker."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medfound.data.ingest import IngestOptions, ingest
from medfound.data.shards import ShardSliceDataset
from medfound.data.sources import Source
from medfound.errors import InputError


@pytest.fixture(scope="module")
def pool(tmp_path_factory, samples):
    """The real DICOM pool plus a lesion dataset, a few phantoms and some bad files."""
    root = tmp_path_factory.mktemp("pool")
    shutil.copytree(samples / "pool", root / "dicom")
    shutil.copytree(samples / "Dataset002_Lesions", root / "lesions")
    (root / "bad").mkdir()
    (root / "bad" / "truncated.nii.gz").write_bytes((samples / "Dataset001_BrainTissue" / "imagesTr" /
                                                    "icbm152_2009a_0000.nii.gz").read_bytes()[:5000])
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), np.nan, np.float32), np.eye(4)), str(root / "bad" / "nan.nii.gz"))
    (root / "bad" / "notes.txt").write_text("not an image")
    (root / "bad" / "empty.dcm").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def shards(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("ing") / "shards"
    manifest = ingest([Source(pool)], out, IngestOptions(size=64, stride=3, shard_size=20), progress=False)
    return out, manifest


def test_manifest_lists_images_and_errors(shards, pool):
    out, m = shards
    assert m == json.loads((out / "manifest.json").read_text())
    bad = {e["path"].split("/")[-1]: e["reason"] for e in m["errors"]}
    assert "truncated.nii.gz" in bad and "nan.nii.gz" in bad and "empty.dcm" in bad
    assert "NaN" in bad["nan.nii.gz"]
    assert m["ignored_files"] >= 1  # notes.txt, dataset.json
    mods = m["slices_per_modality"]
    assert {"CT", "MR", "US", "XR"} <= set(mods)
    lung = next(i for i in m["images"] if i["path"].endswith("lung1_0000.nii.gz"))
    assert lung["modality"] == "CT" and lung["shape"] == [512, 512, 48] and lung["slices"] == 48
    # label maps are never read as images
    assert not any("labelsTr" in i["path"] for i in m["images"])
    assert m["num_slices"] == sum(s["count"] for s in m["shards"]) and len(m["shards"]) > 2


def test_shards_stream_normalised_slices(shards):
    out, m = shards
    items = list(ShardSliceDataset(out))
    assert len(items) == m["num_slices"]
    x, meta = items[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert {"image", "slice", "modality", "key"} <= set(meta)


def test_workers_and_ranks_split_without_duplicates(shards, monkeypatch):
    out, m = shards
    keys = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dl = DataLoader(ShardSliceDataset(out, shuffle=True, buffer=8, seed=5), batch_size=None, num_workers=2)
        keys += [meta["key"] for _, meta in dl]
    assert len(keys) == len(set(keys)) == m["num_slices"]


def test_ingest_refuses_existing_output_and_all_bad(tmp_path, pool, shards):
    out, _ = shards
    with pytest.raises(InputError, match="exists"):
        ingest([Source(pool)], out, progress=False)
    with pytest.raises(InputError, match="no readable images"):
        ingest([Source(pool / "bad")], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x*"))  # no partial folder left behind


def test_source_modality_prefix():
    s = Source.parse("ct:/data/scans")
    assert s.modality == "CT" and str(s.path) == "/data/scans"
    assert Source.parse("/plain/path").modality is None
