"""Guards for what a command writes: checked before any work, so that no output ever replaces or
deletes an input, and a folder of outputs appears whole or not at all.

Rules (the CLI's ``--help`` and the README's "Safety" paragraph state them):
- an output may not equal, contain or lie inside any input (images, example sets, model runs);
- an output folder that exists must be a folder; its parent must be a writable folder;
- the outputs of a multi-image command are written into a hidden staging folder beside the output
  and moved in only when every image has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from medfound.errors import InputError


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that equals, contains or lies inside an input (symlinks resolved)."""
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None or "://" in str(item) or not Path(item).exists():
            continue  # names of shipped models or variants are not paths
        src = Path(item).expanduser().resolve()
        how = _overlap(out, src)
        if how:
            raise InputError(output, f"output {how} the input {item}; choose an output outside the inputs "
                                     "(medfound never writes over or beside what it reads)")


def _writable_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a folder where files can be created."""
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(path, f"cannot create it: {parent} is a file, not a folder")
    try:  # os.access lies for root and on special file systems (/proc): try it for real
        fd, probe = tempfile.mkstemp(prefix=".medfound-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(path, f"cannot write in {parent}: {e.strerror or type(e).__name__}") from None


def check_output_dir(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check an output folder before any work (see the module's rules); returns it as a Path."""
    output = Path(output)
    check_not_input(output, inputs)
    if output.exists():
        if not output.is_dir():
            raise InputError(output, "exists and is a file; the output must be a folder")
        _writable_parent(output / "x")
    else:
        _writable_parent(output)
    return output


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check an output file before any work: not an input, not a folder, in a writable folder."""
    output = Path(output)
    check_not_input(output, inputs)
    if output.is_dir():
        raise InputError(output, "is a folder; give a file name for this output")
    _writable_parent(output)
    return output


@contextlib.contextmanager
def staged_dir(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``output``; on success every file in it is moved into
    ``output`` (created if needed; files of the same name replaced, others kept), on failure it is
    removed and ``output`` is untouched. Use :func:`final_paths` to report where files ended up."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".staging", dir=output.parent))
    try:
        yield stage
        output.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                dest = output / f.relative_to(stage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def final_paths(paths: Iterable[Path], stage: Path, output: str | os.PathLike) -> list[Path]:
    """Where files written under ``stage`` live once :func:`staged_dir` has moved them into ``output``."""
    return [Path(output) / Path(p).relative_to(stage) for p in paths]


def write_label_names(folder: str | os.PathLike, names: dict[int, str]) -> Path:
    """``folder/labels.json``: label value -> name of the masks written there (``"0": "background"``
    included), so a mask keeps its meaning when it leaves medfound."""
    import json

    from medfound.io.atomic import write_text

    table = {"0": "background"} | {str(int(v)): str(n) for v, n in sorted(names.items()) if int(v)}
    path = Path(folder) / "labels.json"
    write_text(path, json.dumps(table, indent=1) + "\n")
    return path
