"""Studies on the server: uploaded images kept in a working folder under random ids.

The client only ever names a study by its id (32 hex characters, checked); no path from a request
touches the file system. Each study holds its canonical (RAS) view, a label map on that grid, an undo
stack and a lock, so concurrent requests on one study queue and requests on different studies never
mix. Masks are downloaded in the geometry of the uploaded image.
"""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfound.data.normalize import intensity_bounds
from medfound.data.orientation import from_canonical, to_canonical
from medfound.errors import InputError
from medfound.io import MedImage, read_image
from medfound.io.formats import sniff_bytes

ID = re.compile(r"^[0-9a-f]{32}$")
#: suffixes some readers need to see (nibabel: .nii.gz; mgz/bmp): taken from an allow-list only
SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")


def safe_upload_name(index: int, client_name: str, data: bytes) -> str:
    """``fileNNNNN`` + a known suffix (from the client's name if allowed, else from the bytes): the client's
    name never becomes a path, its suffix only tells readers that need one which format to expect."""
    name = (client_name or "").lower()
    suffix = next((x for x in SUFFIXES if name.endswith(x)), "")
    if not suffix:  # the bytes tell (sniffed as the readers do); gzip that is not NIfTI is MGZ
        gz = data[:2] == b"\x1f\x8b"
        suffix = {"nifti": ".nii.gz" if gz else ".nii", "png": ".png"}.get(sniff_bytes(data), ".mgz" if gz else "")
    return f"file{index:05d}{suffix}"

UNDO_DEPTH = 20

#: window presets (level, width) per modality; "auto" = the modality's normalisation bounds
PRESETS = {
    "CT": {"soft tissue": (40, 400), "brain": (40, 80), "lung": (-600, 1500), "bone": (400, 1800), "auto": None},
    "default": {"auto": None, "full range": "full"},
}


@dataclass
class Study:
    id: str
    folder: Path
    image: MedImage          # as uploaded (its geometry is what downloads use)
    view: MedImage           # canonical RAS view, sliced along its last axis
    ornt: np.ndarray | None
    mask: np.ndarray         # uint16 label map on the view's grid
    labels: dict[int, str] = field(default_factory=lambda: {1: "label 1"})
    undo: list[np.ndarray] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sam_session: object | None = None

    @property
    def n_slices(self) -> int:
        return 1 if self.view.ndim == 2 else self.view.shape[2]

    def slice(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n_slices:
            raise InputError(None, f"slice {k} out of range 0..{self.n_slices - 1}")
        return self.view.array if self.view.ndim == 2 else self.view.array[:, :, k]

    def mask_slice(self, k: int) -> np.ndarray:
        self.slice(k)
        return self.mask if self.mask.ndim == 2 else self.mask[:, :, k]

    def push_undo(self) -> None:
        self.undo.append(self.mask.copy())
        del self.undo[:-UNDO_DEPTH]

    def presets(self) -> dict:
        mod = self.image.modality
        out = {}
        for name, wl in PRESETS.get(mod, PRESETS["default"]).items():
            if wl is None:
                lo, hi = intensity_bounds(self.view.array, mod)
                wl = ((lo + hi) / 2, hi - lo)
            elif wl == "full":
                lo, hi = float(np.min(self.view.array)), float(np.max(self.view.array))
                wl = ((lo + hi) / 2, max(hi - lo, 1e-6))
            out[name] = [float(wl[0]), float(wl[1])]
        return out

    def volumes_ml(self) -> dict[str, float]:
        voxel_ml = float(np.prod(self.view.spacing[: self.mask.ndim])) / 1000.0
        values, counts = np.unique(self.mask, return_counts=True)
        return {self.labels.get(int(v), f"label {int(v)}"): round(float(c) * voxel_ml, 3)
                for v, c in zip(values, counts) if v}

    def info(self) -> dict:
        return {"id": self.id, "shape": list(self.view.shape), "spacing": [float(s) for s in self.view.spacing],
                "modality": self.image.modality, "format": self.image.format, "slices": self.n_slices,
                "presets": self.presets(), "labels": {str(k): v for k, v in self.labels.items()},
                "volumes_ml": self.volumes_ml(), "undo": len(self.undo),
                "orientation": "RAS canonical, axial slices shown in neurological convention (patient left on the left)"}

    def mask_in_image_geometry(self) -> np.ndarray:
        return from_canonical(self.mask, self.ornt) if self.ornt is not None else self.mask


class StudyStore:
    """Thread-safe registry of studies in ``workdir`` (one sub-folder per id)."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir)
        (self.root / "studies").mkdir(parents=True, exist_ok=True)
        self._studies: dict[str, Study] = {}
        self._lock = threading.Lock()

    def add(self, files: list[tuple[str, bytes]]) -> Study:
        """Store uploaded bytes under a new id and read them (content sniffed; several files = one DICOM
        series). Bad files raise InputError and leave nothing behind."""
        sid = uuid.uuid4().hex
        folder = self.root / "studies" / sid
        upload = folder / "upload"
        upload.mkdir(parents=True)
        try:
            names = [safe_upload_name(i, n, d) for i, (n, d) in enumerate(files)]
            for name, (_, data) in zip(names, files):
                (upload / name).write_bytes(data)  # client file names are never used as paths
            target = upload / names[0] if len(files) == 1 else upload
            image = read_image(target)
            if image.ndim == 3 and image.meta.get("frames_are_time"):
                raise InputError(files[0][0], "time series (cine) are not supported in the viewer")
            view, ornt = (to_canonical(image) if image.ndim == 3 else (image, None))
            view = view.with_array(np.ascontiguousarray(view.array))
            study = Study(sid, folder, image, view, ornt, np.zeros(view.shape, dtype=np.uint16))
        except InputError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(files[0][0] if files else None, e.problem) from None
        except Exception as e:  # any reader failure is the file's problem, not the service's
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(files[0][0] if files else None, f"cannot read as a medical image ({type(e).__name__})") from None
        with self._lock:
            self._studies[sid] = study
        return study

    def get(self, sid: str) -> Study:
        if not ID.match(sid or ""):
            raise KeyError(sid)
        with self._lock:
            return self._studies[sid]
