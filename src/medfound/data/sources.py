"""Unlabeled pools: ``[modality:]PATH`` sources (PATH a folder, a file or a DICOMweb study/query) and the image files (and DICOM series) inside them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from medfound.errors import InputError
from medfound.io.formats import extension_format, sniff_format
from medfound.io.image import canonical_modality, is_known_modality

#: Folders never read as images: nnU-Net label maps are not unlabeled data.
LABEL_DIRS = frozenset({"labelsTr", "labelsTs", "labelsVal"})


@dataclass(frozen=True)
class Source:
    """A pool root and the modality the user declared for it (``None``: read it from the files)."""

    path: Path
    modality: str | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        """``ct:/data/scans`` -> Source('/data/scans', 'CT'); a bare path keeps modality None."""
        prefix, sep, rest = str(text).partition(":")
        if sep and is_known_modality(prefix) and not Path(text).exists():
            return cls(Path(rest), canonical_modality(prefix))
        return cls(Path(text), None)


@dataclass
class ImageRef:
    """One image to read: a single file, or the files of one DICOM series."""

    paths: list[str]
    fmt: str
    modality: str | None = None
    series_uid: str | None = None

    @property
    def label(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{Path(self.paths[0]).parent} (series {self.series_uid})"


@dataclass
class ScanResult:
    images: list[ImageRef] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def scan_sources(sources: list[Source]) -> ScanResult:
    """Find every image under the sources; DICOM files are grouped into series."""
    from medfound.io.dicom import find_series
    from medfound.io.dicomweb import is_dicomweb, localise

    result = ScanResult()
    for src in sources:
        if is_dicomweb(src.path):  # every series the study or query names, fetched into the cache
            files = [f for _, folder, _ in localise(src.path, images_only=True) for f in sorted(_walk(folder))]
        elif not src.path.exists():
            raise InputError(src.path, "no such file or folder")
        else:
            files = [src.path] if src.path.is_file() else sorted(_walk(src.path))
            if src.path.is_dir() and not files:
                raise InputError(src.path, "folder holds no files")
        dicoms: list[Path] = []
        for f in files:
            fmt = sniff_format(f) if f.stat().st_size else None
            if fmt is None:
                if extension_format(f) is not None or f.stat().st_size == 0:
                    reason = "file is empty" if f.stat().st_size == 0 else "content does not match its image extension (truncated or corrupt?)"
                    result.errors.append((str(f), reason))
                else:
                    result.ignored.append(str(f))
            elif fmt == "dicom":
                dicoms.append(f)
            else:
                result.images.append(ImageRef([str(f)], fmt, src.modality or nnunet_modality(f)))
        if dicoms:
            series, errs = find_series(dicoms)
            result.errors.extend(errs)
            for s in series:
                uid = None if s.uid.startswith("file:") else s.uid
                if s.positioned or len(s.files) == 1:
                    result.images.append(ImageRef(sorted(s.files), "dicom", src.modality, uid))
                else:  # a series of separate 2D images (radiographs, ultrasound frames): one image each
                    result.images += [ImageRef([f], "dicom", src.modality, uid) for f in sorted(s.files)]
    return result


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in LABEL_DIRS and not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def nnunet_modality(path: Path) -> str | None:
    """Modality of an image inside an nnU-Net dataset (``images*/CASE_0000.ext``), from its
    dataset.json (per-case modality if recorded, else channel 0's name); None elsewhere."""
    folder = path.parent
    js = folder.parent / "dataset.json"
    if not folder.name.startswith("images") or not js.is_file():
        return None
    try:
        info = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ending = info.get("file_ending", ".nii.gz")
    case = path.name[: -len(ending)].rsplit("_", 1)[0] if path.name.endswith(ending) else None
    per_case = info.get("medfound", {}).get("case_modalities", {})
    name = per_case.get(case) or info.get("channel_names", {}).get("0")
    return canonical_modality(name) if name and is_known_modality(name) else None
