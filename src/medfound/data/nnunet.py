"""nnU-Net v2 raw dataset folders: ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``,
optional ``imagesTs/``, and ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
``file_ending``). Reading checks what nnU-Net would only find out mid-training: that every label map
lies on its image's grid and holds only declared labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfound.data.heldout import heldout_labels
from medfound.errors import InputError
from medfound.io import MedImage, read_image
from medfound.io.atomic import atomic_dir
from medfound.io.json_file import read_json
from medfound.io.write import write_image, mask_like

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class NnUNetDataset:
    """An nnU-Net v2 raw dataset on disk."""

    root: Path
    info: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> NnUNetDataset:
        root = Path(root)
        if not root.exists():
            raise InputError(root, "no such dataset folder")
        js = root / "dataset.json"
        if not js.is_file():
            raise InputError(root, "not an nnU-Net dataset: dataset.json is missing")
        info = read_json(js)
        missing = [k for k in REQUIRED_KEYS if k not in info]
        if missing:
            raise InputError(js, f"missing key(s) {', '.join(missing)}")
        if not (root / "imagesTr").is_dir():
            raise InputError(root, "not an nnU-Net dataset: imagesTr/ is missing")
        return cls(root=root, info=info)

    @property
    def name(self) -> str:
        return self.info.get("name", self.root.name)

    @property
    def file_ending(self) -> str:
        return self.info["file_ending"]

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> value (region-based labels are flattened to their first value)."""
        return {n: (v[0] if isinstance(v, list) else int(v)) for n, v in self.info["labels"].items()}

    @property
    def label_names(self) -> dict[int, str]:
        return {v: n for n, v in self.labels.items()}

    @property
    def channel_names(self) -> dict[str, str]:
        return self.info["channel_names"]

    @property
    def heldout(self) -> dict[str, int]:
        return heldout_labels(self.labels)

    def case_modality(self, case: str) -> str:
        per_case = self.info.get("medfound", {}).get("case_modalities", {})
        return per_case.get(case) or self.channel_names.get("0", "OT")

    def cases(self, split: str = "Tr") -> list[str]:
        folder = self.root / f"images{split}"
        if not folder.is_dir():
            return []
        suffix = "_0000" + self.file_ending
        return sorted(f.name[: -len(suffix)] for f in folder.iterdir() if f.name.endswith(suffix))

    def image_path(self, case: str, split: str = "Tr", channel: int = 0) -> Path:
        return self.root / f"images{split}" / f"{case}_{channel:04d}{self.file_ending}"

    def label_path(self, case: str, split: str = "Tr") -> Path:
        return self.root / f"labels{split}" / f"{case}{self.file_ending}"

    def read_image(self, case: str, split: str = "Tr") -> MedImage:
        return read_image(self.image_path(case, split), modality=self.case_modality(case))

    def read_label(self, case: str, image: MedImage, split: str = "Tr") -> MedImage | None:
        """The case's label map, checked against ``image``'s grid and the declared labels."""
        path = self.label_path(case, split)
        if not path.exists():
            if split == "Tr":
                raise InputError(path, "label file missing for training case")
            return None
        label = read_image(path)
        check_label(label, image, path, set(self.labels.values()))
        return label

    def read_case(self, case: str, split: str = "Tr") -> tuple[MedImage, MedImage | None]:
        image = self.read_image(case, split)
        return image, self.read_label(case, image, split)


def check_label(label: MedImage, image: MedImage, path: str | os.PathLike, allowed: set[int] | None = None) -> None:
    """Raise :class:`InputError` unless ``label`` lies on ``image``'s grid with integer values."""
    if label.shape != image.shape:
        raise InputError(path, f"label shape {label.shape} does not match image shape {image.shape}")
    if not np.allclose(label.affine, image.affine, atol=1e-3, rtol=1e-5):
        raise InputError(path, "label geometry (spacing/origin/direction) does not match its image")
    arr = label.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(path, "label map holds non-integer values")
    if arr.size and np.min(arr) < 0:
        raise InputError(path, f"label map holds negative values (min {np.min(arr):g}); labels are 0 (background) and up")
    if allowed is not None:
        extra = sorted(set(np.unique(arr).astype(int).tolist()) - allowed)
        if extra:
            raise InputError(path, f"label values {extra[:10]} are not declared in dataset.json labels")


def write_dataset(root: str | os.PathLike, cases: Iterable[tuple[str, MedImage, np.ndarray | None]],
                  labels: dict[str, int], channel_names: dict[str, str], name: str | None = None,
                  description: str = "", file_ending: str = ".nii.gz",
                  test_cases: Iterable[tuple[str, MedImage, np.ndarray | None]] = (),
                  extra: dict | None = None, overwrite: bool = True) -> NnUNetDataset:
    """Write an nnU-Net v2 raw dataset atomically. ``cases`` yields (case id, image, label map or
    None); labels are written on the image's grid. ``extra`` goes under ``dataset.json["medfound"]``."""
    root = Path(root)
    if "background" not in labels or labels["background"] != 0:
        labels = {"background": 0, **{k: v for k, v in labels.items() if k != "background"}}
    with atomic_dir(root, overwrite=overwrite) as tmp:
        n = 0
        for split, items in (("Tr", cases), ("Ts", test_cases)):
            for case, image, label in items:
                write_image(image, tmp / f"images{split}" / f"{case}_0000{file_ending}")
                if label is not None:
                    write_image(mask_like(label, image), tmp / f"labels{split}" / f"{case}{file_ending}")
                n += split == "Tr"
        info = {
            "name": name or root.name,
            "description": description,
            "channel_names": channel_names,
            "labels": labels,
            "numTraining": n,
            "file_ending": file_ending,
        }
        med = dict(extra or {})
        med["heldout_labels"] = heldout_labels(labels)
        info["medfound"] = med
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
    return NnUNetDataset.open(root)


def convert_msd(msd_root: str | os.PathLike, out: str | os.PathLike) -> NnUNetDataset:
    """Convert a Medical Segmentation Decathlon task folder (4D multi-channel NIfTI allowed) to an
    nnU-Net v2 raw dataset, as nnU-Net's own converter does."""
    msd_root = Path(msd_root)
    js = msd_root / "dataset.json"
    if not js.is_file():
        raise InputError(msd_root, "not a Decathlon task folder: dataset.json is missing")
    info = json.loads(js.read_text())
    modality = info.get("modality", {"0": "OT"})
    labels = {name: int(v) for v, name in info["labels"].items()}
    labels = {("background" if v == 0 else n): v for n, v in labels.items()}

    if len(modality) > 1:
        raise InputError(msd_root, f"{len(modality)}-channel Decathlon tasks are not supported yet; medfound models take one channel")

    def items(entries):
        for entry in entries:
            img_rel = entry["image"] if isinstance(entry, dict) else entry
            img_path = msd_root / img_rel
            if img_path.name.startswith("._"):  # macOS resource forks shipped in the MSD tarballs
                continue
            image = read_image(img_path, modality=modality.get("0", "OT"))
            label = None
            if isinstance(entry, dict) and entry.get("label"):
                label_image = read_image(msd_root / entry["label"])
                check_label(label_image, image, msd_root / entry["label"], set(labels.values()))
                label = label_image.array
            yield img_path.name.split(".nii")[0], image, label

    return write_dataset(out, items(info.get("training", [])), labels, dict(modality),
                         name=info.get("name"), description=info.get("description", ""),
                         test_cases=items(info.get("test", [])))
