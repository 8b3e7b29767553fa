"""Real sample data from installed packages, phantoms, and the demo end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from medfound.data.nnunet import NnUNetDataset
from medfound.data.phantoms import PHANTOM_MODALITIES, make_phantom
from medfound.data.samples import MRICRON_DIR, materialise_samples


def test_tissue_and_lesion_datasets(samples):
    tissue = NnUNetDataset.open(samples / "Dataset001_BrainTissue")
    image, label = tissue.read_case("icbm152_2009a")
    assert image.shape == (197, 233, 189) and set(np.unique(label.array)) == {0, 1, 2}
    assert len(tissue.cases()) >= 3  # ICBM 2009a/2009c, MNI152 (+ Colin27 with mricron-data)
    _, gmm = tissue.read_case("mni152_fsl")
    frac = np.bincount(gmm.array.ravel(), minlength=3) / gmm.array.size
    assert 0.05 < frac[1] < 0.3 and 0.05 < frac[2] < 0.3  # plausible GM and WM volumes
    lesions = NnUNetDataset.open(samples / "Dataset002_Lesions")
    assert lesions.cases() == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    assert lesions.case_modality("lung1") == "CT" and lesions.case_modality("brain1") == "MR"
    for case in lesions.cases():
        img, lab = lesions.read_case(case)
        assert lab.array.any()


def test_pool_is_deduplicated_and_mixed(samples):
    info = json.loads((samples / "pool" / "pool.json").read_text())
    mods = {i["modality"] for i in info["images"]}
    assert {"CT", "MR", "US", "XR", "NM"} <= mods
    assert 12 <= len(info["images"]) <= 30
    names = {Path(i["file"]).name for i in info["images"]}
    assert not ({"MR2_UNCI.dcm", "MR2_J2KI.dcm"} <= names)  # re-encodings kept once


def test_atlas_datasets_record_heldout_labels(tmp_path):
    made = materialise_samples(tmp_path, ("atlases",), progress=False)
    assert len(made["atlases"]) >= 5
    aal = NnUNetDataset.open(tmp_path / "Dataset011_MNI152_AAL")
    held = aal.heldout
    assert any("Thalamus" in n for n in held) and any("Hippocampus" in n for n in held)
    assert not any("Precentral" in n for n in held)
    img, lab = aal.read_case("mni152")
    present = set(np.unique(lab.array).tolist())
    assert set(held.values()) <= present  # held-out structures stay as evaluation truth


@pytest.mark.skipif(not MRICRON_DIR.is_dir(), reason="Debian mricron-data not installed")
def test_colin27(tmp_path):
    materialise_samples(tmp_path, ("colin27",), progress=False)
    ds = NnUNetDataset.open(tmp_path / "Dataset021_Colin27_AAL")
    img, lab = ds.read_case("colin27")
    assert img.shape == (181, 217, 181) and len(ds.labels) == 117


@pytest.mark.parametrize("modality", PHANTOM_MODALITIES)
def test_phantoms_have_all_structures(modality):
    img, lab = make_phantom(modality, seed=7)
    assert img.modality == modality and img.shape == lab.shape
    assert {1, 2, 4} <= set(np.unique(lab).tolist())
    assert img.ndim == (2 if modality in ("XR", "US") else 3)


def run_demo_and_check(out, skip: tuple[str, ...] = ()) -> str:
    """``medfound demo`` with few steps; the report's sections checked for every stage not skipped."""
    from conftest import run_cli

    from medfound.viewer.browser import chromium_path

    r = run_cli("demo", "--out", out, "--pretrain-steps", "4", "--finetune-steps", "3", "--sam-steps", "3",
                "--baseline-steps", "3", "--skip", ",".join(skip), timeout=2600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out / "report"
    html = (report / "index.html").read_text()
    assert "Unlabeled pool ingested" in html and "Dataset002_Lesions" in html
    if "sam" not in skip:
        assert "SAM path" in html and (report / "img/sam_box.png").is_file()
        assert "shipped small SAM on held-out structures" in html and (report / "img/sam_shipped.png").is_file()
    if "adaptation" not in skip:
        assert "Adaptation with few labels" in html and (report / "img/label_efficiency.png").is_file()
        assert "follow 2 conventions" in html  # why one seed can rank two labeled brains below one
    else:
        assert "Adaptation with few labels" not in html and "adaptation: left out (--skip)" in r.stdout
    if (out / "data" / "Dataset021_Colin27_AAL").is_dir():  # needs Debian mricron-data
        assert "In-context segmentation" in html and (report / "img/support_size.png").is_file()
        assert (report / "img/incontext_overlays.png").stat().st_size > 10_000
        if chromium_path() and "viewer" not in skip:
            assert (report / "img/viewer.png").stat().st_size > 10_000
    assert "MAE pretraining" in html and (out / "pretrain" / "encoder.safetensors").is_file()
    for img in ("img/Dataset002_Lesions.png", "img/shards_by_modality.png", "img/pretrain_loss.png"):
        assert (report / img).stat().st_size > 10_000
    return html


@pytest.mark.timeout(2700)  # 3-8 min on 2 free cores, measured up to 4x that on a contended CI machine
def test_demo_end_to_end(tmp_path):
    """The demo with the stages other tests cover on their own left out: label efficiency
    (test_experiments) and the viewer (test_viewer)."""
    run_demo_and_check(tmp_path / "demo", skip=("adaptation", "viewer"))
    m = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert m["num_slices"] > 200 and {"CT", "MR", "PT", "US", "XR"} <= set(m["slices_per_modality"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_every_stage(tmp_path):
    """``make demo``'s run, every stage, with few steps."""
    run_demo_and_check(tmp_path / "demo")


def test_demo_skip_names_a_stage(tmp_path):
    from conftest import run_cli

    r = run_cli("demo", "--out", tmp_path / "demo", "--skip", "sam,training")
    assert r.returncode == 2 and "--skip: no stage 'training'" in r.stderr and not (tmp_path / "demo").exists()
