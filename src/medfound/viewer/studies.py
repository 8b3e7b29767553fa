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
import time
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
#: compressed bytes of undo history kept per study (oldest steps dropped beyond it)
UNDO_BYTES = 64 * 2**20


@dataclass
class UndoStep:
    """The label map before one edit: only the slices the edit touches (all when ``slices`` is None),
    zlib-compressed (label maps are mostly background), so 20 steps on a 512^3 study cost little."""

    slices: list[int] | None
    data: bytes
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray, slices: list[int] | None) -> UndoStep:
        import zlib

        part = mask if slices is None or mask.ndim == 2 else mask[:, :, slices]
        return cls(slices if mask.ndim == 3 else None, zlib.compress(np.ascontiguousarray(part).tobytes(), 1), part.shape)

    def restore(self, mask: np.ndarray) -> None:
        import zlib

        part = np.frombuffer(zlib.decompress(self.data), dtype=mask.dtype).reshape(self.shape)
        if self.slices is None:
            mask[...] = part
        else:
            mask[:, :, self.slices] = part

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
    undo: list[UndoStep] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sam_session: object | None = None
    ignored_files: list[str] = field(default_factory=list)  # client names of upload parts that are not images
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        """Memory held: the uploaded array, its canonical view (when a copy), the label map, the undo."""
        view = 0 if np.shares_memory(self.view.array, self.image.array) else self.view.array.nbytes
        return self.image.array.nbytes + view + self.mask.nbytes + sum(len(u.data) for u in self.undo)

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

    def push_undo(self, slices: list[int] | None = None) -> None:
        """Remember the label map (only ``slices`` of it, when given) before an edit."""
        self.undo.append(UndoStep.of(self.mask, slices))
        del self.undo[:-UNDO_DEPTH]
        while len(self.undo) > 1 and sum(len(u.data) for u in self.undo) > UNDO_BYTES:
            del self.undo[0]

    def pop_undo(self) -> None:
        self.undo.pop().restore(self.mask)

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
                "volumes_ml": self.volumes_ml(), "undo": len(self.undo), "ignored_files": self.ignored_files,
                "orientation": "RAS canonical, axial slices shown in neurological convention (patient left on the left)"}

    def mask_in_image_geometry(self) -> np.ndarray:
        return from_canonical(self.mask, self.ornt) if self.ornt is not None else self.mask


class StudyStore:
    """Thread-safe registry of studies in ``workdir`` (one sub-folder per id), within limits: voxels per
    upload, total memory of all open studies, and an idle time after which a study is closed."""

    def __init__(self, workdir: str | Path, max_voxels: int = 100_000_000, memory_bytes: int = 4 * 2**30,
                 idle_seconds: float = 3600.0):
        self.root = Path(workdir)
        (self.root / "studies").mkdir(parents=True, exist_ok=True)
        self.max_voxels, self.memory_bytes, self.idle_seconds = max_voxels, memory_bytes, idle_seconds
        self._studies: dict[str, Study] = {}
        self._lock = threading.Lock()

    def _client_error(self, e: InputError, names: dict[str, str], fallback: str | None) -> InputError:
        """``e`` in the client's terms: saved paths replaced by the client's file names, the work folder
        never shown."""
        def clean(text: str) -> str:
            for saved, client in sorted(names.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(saved, client)
            return text.replace(str(self.root.resolve()), "").replace(str(self.root), "")

        path = names.get(e.path or "", None) or (fallback if e.path is None or str(self.root) in e.path else clean(e.path))
        return InputError(path, clean(str(e.problem)))

    def _check_voxels(self, target: Path, client: str) -> None:
        """Refuse an image with more voxels than allowed, from its header where the format has one
        (before it is decompressed into memory)."""
        shape = header_shape(target)
        if shape is not None and int(np.prod(shape)) > self.max_voxels:
            raise InputError(client, f"image of {'x'.join(map(str, shape))} voxels is larger than this viewer's "
                                     f"limit of {self.max_voxels:,} voxels")

    def add(self, files: list[tuple[str, bytes]]) -> Study:
        """Store uploaded bytes under a new id and read them (content sniffed; several files = one DICOM
        series, parts that are not DICOM listed in ``ignored_files``). Bad files raise InputError and
        leave nothing behind."""
        from medfound.io.formats import sniff_bytes

        self.expire()
        sid = uuid.uuid4().hex
        folder = self.root / "studies" / sid
        upload = folder / "upload"
        upload.mkdir(parents=True)
        names: dict[str, str] = {}
        ignored: list[str] = []
        first = files[0][0] if files else None
        try:
            kept = files
            if len(files) > 1:  # a series: keep the DICOM parts, name the others
                kept = [(n, d) for n, d in files if sniff_bytes(d, n) == "dicom"]
                ignored = [n for n, d in files if sniff_bytes(d, n) != "dicom"]
                if not kept:
                    raise InputError(first, "a multi-file upload must be one DICOM series; no part is DICOM")
            saved = [safe_upload_name(i, n, d) for i, (n, d) in enumerate(kept)]
            for name, (client, data) in zip(saved, kept):
                (upload / name).write_bytes(data)  # client file names are never used as paths
                names[str(upload / name)] = client or "upload"
            target = upload / saved[0] if len(kept) == 1 else upload
            self._check_voxels(target, kept[0][0])
            image = read_image(target)
            if image.array.size > self.max_voxels:
                raise InputError(kept[0][0], f"image of {image.array.size:,} voxels is larger than this viewer's "
                                             f"limit of {self.max_voxels:,} voxels")
            if image.ndim == 3 and image.meta.get("frames_are_time"):
                raise InputError(kept[0][0], "time series (cine) are not supported in the viewer")
            view, ornt = (to_canonical(image) if image.ndim == 3 else (image, None))
            view = view.with_array(np.ascontiguousarray(view.array))
            study = Study(sid, folder, image, view, ornt, np.zeros(view.shape, dtype=np.uint16), ignored_files=ignored)
            with self._lock:
                used = sum(s.nbytes for s in self._studies.values())
                if used + study.nbytes > self.memory_bytes:
                    raise InputError(first, f"the viewer's memory budget ({self.memory_bytes / 2**20:.0f} MB) is full "
                                            f"({used / 2**20:.0f} MB in {len(self._studies)} open studies): close a "
                                            "study (DELETE /api/studies/ID) or wait for idle ones to expire")
                self._studies[sid] = study
        except InputError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise self._client_error(e, names, first) from None
        except Exception as e:  # any reader failure is the file's problem, not the service's
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(first, f"cannot read as a medical image ({type(e).__name__})") from None
        return study

    def get(self, sid: str) -> Study:
        if not ID.match(sid or ""):
            raise KeyError(sid)
        self.expire()
        with self._lock:
            study = self._studies[sid]
            study.last_used = time.monotonic()
            return study

    def delete(self, sid: str) -> None:
        """Close a study: forget it and remove its files."""
        if not ID.match(sid or ""):
            raise KeyError(sid)
        with self._lock:
            study = self._studies.pop(sid)
        with study.lock:  # wait for a request still working on it
            shutil.rmtree(study.folder, ignore_errors=True)

    def expire(self) -> list[str]:
        """Close the studies idle for longer than ``idle_seconds``; returns their ids."""
        now = time.monotonic()
        with self._lock:
            old = [sid for sid, s in self._studies.items() if now - s.last_used > self.idle_seconds and not s.lock.locked()]
        for sid in old:
            try:
                self.delete(sid)
            except KeyError:
                pass
        return old

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._studies.values())


def header_shape(path: Path) -> tuple[int, ...] | None:
    """The image's shape from its header alone (NIfTI/MGZ through nibabel, NRRD/MHA through SimpleITK,
    a DICOM folder as rows x columns x files), or None when the format gives none cheaply."""
    from medfound.io.formats import sniff_format

    try:
        if path.is_dir():
            import pydicom

            files = [f for f in path.iterdir() if f.is_file()]
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            return (int(ds.Rows), int(ds.Columns), len(files) * int(ds.get("NumberOfFrames", 1) or 1))
        fmt = sniff_format(path)
        if fmt in ("nifti", "mgz"):
            import nibabel as nib

            return tuple(int(n) for n in nib.load(str(path)).shape)
        if fmt in ("nrrd", "mha"):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return tuple(int(n) for n in reader.GetSize())
        if fmt == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return (int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:
        return None  # the reader will name the problem
    return None
