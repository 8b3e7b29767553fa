"""Write files and folders so that a crash or an error never leaves a half-written output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _suffixes(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.lower().endswith(".nii.gz") else "".join(path.suffixes[-1:])


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers pick the same format);
    rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_suffixes(path)}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: written into every folder :func:`atomic_dir` makes: ``overwrite`` replaces only folders that hold it
MARKER = ".medfound-output"


def is_medfound_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder medfound wrote (its marker, or the index file of an ingest output,
    a sample pool or a medfound-written nnU-Net dataset), so that replacing it loses nothing of the user's."""
    import json

    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file() or (path / "pool.json").is_file():
        return True
    for index, key in (("manifest.json", "shards"), ("dataset.json", "medfound")):
        try:
            if key in json.loads((path / index).read_text()):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise InputError unless ``path`` is absent or a folder medfound wrote (checked before any work)."""
    from medfound.errors import InputError

    path = Path(path)
    if path.exists() and not is_medfound_output(path):
        what = "a file" if not path.is_dir() else "a folder medfound did not write"
        raise InputError(path, f"exists and is {what}; refusing to replace it (choose a new output folder)")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.
    ``overwrite`` replaces only a folder medfound wrote (:func:`is_medfound_output`), never a user's."""
    path = Path(path)
    if overwrite:
        check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by medfound; `--overwrite` may replace this folder\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            check_replaceable(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, rows: list[dict], float_format: str = "{:.6g}") -> None:
    """Rows of dicts (same keys) as a CSV with a header, floats compactly formatted."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    w.writeheader()
    for r in rows:
        w.writerow({k: (float_format.format(v) if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
