"""Recognise an image file's format from its content, not its name.

Extensions lie (``.dcm``-less DICOM exports, ``.nii`` files that are gzipped); the first bytes do not.
The extension is used only to tell apart formats whose bytes look alike (NIfTI vs MGZ, both gzip).
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

#: Formats medfound reads; values of :func:`sniff_format`.
FORMATS = ("nifti", "mgz", "nrrd", "mha", "dicom", "png", "jpeg", "tiff", "bmp")

_EXT_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mgz": "mgz",
    ".mgh": "mgz",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
}


def extension_format(path: str | os.PathLike) -> str | None:
    """Format implied by the file name alone (``None`` if the name says nothing)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".gz"):
        name = name[:-3]
    return _EXT_FORMATS.get(Path(name).suffix)


def _head(path: Path, n: int = 1024) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":  # gzip: look inside
        try:
            with gzip.open(path, "rb") as g:
                return b"GZ" + g.read(n)
        except (OSError, EOFError):
            return b"GZ"
    return head


def sniff_format(path: str | os.PathLike) -> str | None:
    """The format of ``path`` from its bytes, or ``None`` if it is not an image medfound reads."""
    p = Path(path)
    try:
        head = _head(p)
    except OSError:
        return None
    return _sniff_head(head, p)


def sniff_bytes(data: bytes, name: str = "") -> str | None:
    """:func:`sniff_format` for a file held in memory (an upload); ``name`` plays the path's part."""
    head = data[:1024]
    if head[:2] == b"\x1f\x8b":
        try:
            head = b"GZ" + gzip.GzipFile(fileobj=io.BytesIO(data)).read(1024)
        except (OSError, EOFError):
            head = b"GZ"
    return _sniff_head(head, Path(name or "upload"))


def _sniff_head(head: bytes, p: Path) -> str | None:
    gz = head.startswith(b"GZ")
    body = head[2:] if gz else head
    if len(body) >= 348 and body[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(body) >= 544 and body[4:8] in (b"n+2\x00",):
        return "nifti"
    if body.startswith(b"NRRD"):
        return "nrrd"
    if len(body) >= 132 and body[128:132] == b"DICM":
        return "dicom"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if body.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if body[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if body.startswith(b"BM") and extension_format(p) == "bmp":
        return "bmp"
    text = body[:256].lstrip()
    if text.startswith((b"ObjectType", b"NDims")):
        return "mha"
    ext = extension_format(p)
    if ext == "mgz" and (gz or body[:4] == b"\x00\x00\x00\x01"):
        return "mgz"
    if gz and ext == "nifti":
        return "nifti"  # truncated gzip: let the NIfTI reader name the problem
    if ext == "dicom" or (ext is None and _looks_like_raw_dicom(body)):
        return "dicom"  # DICOM without the 128-byte preamble
    return None


def _looks_like_raw_dicom(body: bytes) -> bool:
    # Preamble-less DICOM starts with a group 0x0008 (or 0x0002) little-endian tag.
    return len(body) > 8 and body[:2] in (b"\x08\x00", b"\x02\x00") and body[2:4] < b"\xff\xff"


def case_name(path: str | os.PathLike, strip_channel: bool = False) -> str:
    """A file's case name as nnU-Net uses it: the name without its (possibly double) extension,
    and for images (``strip_channel``) without the ``_0000`` channel suffix."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        name = Path(name).stem
    if strip_channel and len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name
