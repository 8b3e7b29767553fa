"""Labeled nnU-Net cases as square 2D slices for fine-tuning, split by case (never by slice).

Training classes are the dataset's labels minus the held-out structures (which become background),
renumbered 1..K; ``class_to_label`` maps predictions back to the dataset's label values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from medfound.data.heldout import is_heldout
from medfound.data.nnunet import NnUNetDataset
from medfound.data.normalize import normalize
from medfound.data.orientation import to_canonical
from medfound.data.slicing import iter_slices, to_square
from medfound.errors import InputError


@dataclass
class CaseSlices:
    case: str
    images: np.ndarray  # (n, S, S) float32 in [0, 1]
    labels: np.ndarray  # (n, S, S) uint8 training classes


def training_classes(ds: NnUNetDataset, exclude_heldout: bool = True) -> dict[int, str]:
    """Dataset label value -> name of the labels a model may be trained on (class order = sorted)."""
    out = {v: n for n, v in sorted(ds.labels.items(), key=lambda kv: kv[1])
           if v != 0 and not (exclude_heldout and is_heldout(n))}
    if not out:
        raise InputError(ds.root, "no trainable labels: every label is held out (DESIGN.md held-out rule)")
    return out


def split_cases(cases: list[str], label_fraction: float, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(labeled training cases, validation cases): validation first, then the fraction of the rest."""
    if len(cases) < 2:
        raise InputError(None, f"need at least 2 labeled cases to split training and validation by case (got {len(cases)})")
    if not 0 < label_fraction <= 1:
        raise InputError(None, f"--label-fraction must be in (0, 1], got {label_fraction}")
    order = list(np.random.default_rng(seed).permutation(cases))
    n_val = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    val, pool = sorted(order[:n_val]), order[n_val:]
    n_train = max(1, int(round(label_fraction * len(pool))))
    return sorted(pool[:n_train]), val


def case_slices(ds: NnUNetDataset, case: str, size: int, lut: np.ndarray, axis: int = 2,
                keep_empty: float = 0.25, rng: np.random.Generator | None = None) -> CaseSlices:
    """Normalised square slices of one case with its labels mapped through ``lut`` (value -> class).
    Slices without any training label are kept with probability ``keep_empty``."""
    image, label = ds.read_case(case)
    norm = image.with_array(normalize(image.array, image.modality))
    lab = label.with_array(lut[np.clip(label.array.astype(np.int64), 0, len(lut) - 1)])
    if norm.ndim == 3:
        norm, _ = to_canonical(norm)
        lab, _ = to_canonical(lab)
    rng = rng or np.random.default_rng(0)
    imgs, labs = [], []
    for (k, sl, spacing), (_, ls, _) in zip(iter_slices(norm, axis), iter_slices(lab, axis)):
        if not ls.any() and rng.random() >= keep_empty:
            continue
        imgs.append(to_square(sl, spacing, size)[0])
        labs.append(to_square(ls.astype(np.float32), spacing, size, nearest=True)[0].astype(np.uint8))
    if not imgs:
        raise InputError(ds.label_path(case), "case has no slices to train on")
    return CaseSlices(case, np.stack(imgs), np.stack(labs))


def label_lut(ds: NnUNetDataset, classes: dict[int, str]) -> np.ndarray:
    """Dataset label value -> training class (0 for background and held-out labels)."""
    lut = np.zeros(max(ds.labels.values()) + 1, dtype=np.uint8)
    for c, v in enumerate(sorted(classes), start=1):
        lut[v] = c
    return lut


class SliceDataset(Dataset):
    """(image (1, S, S), label (1, S, S)) pairs with 2D augmentation (MONAI RandAffine, flips)."""

    def __init__(self, cases: list[CaseSlices], augment: bool = True, seed: int = 0):
        self.images = np.concatenate([c.images for c in cases])
        self.labels = np.concatenate([c.labels for c in cases])
        self.augment = augment
        if augment:
            from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

            self.tf = Compose([
                RandAffined(keys=["image", "label"], prob=0.7, rotate_range=0.26, scale_range=0.15,
                            mode=("bilinear", "nearest"), padding_mode="zeros"),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
                RandShiftIntensityd(keys="image", offsets=0.08, prob=0.5),
            ])
            self.tf.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = {"image": torch.from_numpy(self.images[i][None]), "label": torch.from_numpy(self.labels[i][None].astype(np.float32))}
        if self.augment:
            item = self.tf(item)
        return torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"]).long()
