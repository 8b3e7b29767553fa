"""A whole archive in one command: every series a DICOMweb (QIDO-RS) query finds, segmented or
predicted one by one, with a row per series in ``OUT/batch.csv``.

Failures stay per series: a bad series is a ``failed`` row with its one-line reason, and the others go
on. A rerun skips the series that are ``done`` (and whose output is still there) and retries the rest,
so an interrupted or partly failed batch is finished by running the same command again.

Where the series run is an ``Executor`` (``concurrent.futures``' interface): in this process, in
``--workers N`` local processes, or on a Dask cluster (``--scheduler ADDRESS``, through
``distributed.Client.get_executor``). Dask rather than Ray: it is pure Python from PyPI, its local
cluster starts in a second with no daemon, and its executor has the standard-library interface, so
the local and the cluster path share every line but the one that makes the executor.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medfound.errors import InputError

#: the columns of ``batch.csv``
COLUMNS = ("series_uid", "study_uid", "modality", "status", "seconds", "output", "error", "pushed")
COMMANDS = ("segment", "predict")


@dataclass(frozen=True)
class SeriesJob:
    """One series of the batch and what to do with it (everything a worker needs, picklable)."""

    command: str  # "segment" or "predict"
    url: str  # dicomweb+http(s)://.../studies/S/series/R
    series_uid: str
    study_uid: str
    modality: str
    output: str  # this series' folder
    push: bool = False
    options: dict = field(default_factory=dict)  # keyword arguments of segment_path / predict_path


def run_series(job: SeriesJob) -> dict:
    """Run one series; never raises for the series' own problems (they become a ``failed`` row)."""
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.monotonic()
    row = {"series_uid": job.series_uid, "study_uid": job.study_uid, "modality": job.modality, "status": "done",
           "seconds": 0.0, "output": job.output, "error": "", "pushed": ""}
    try:
        written = _run(job)
        if job.push:
            from medfound.io.dicomweb import push

            row["pushed"] = " ".join(push(job.url, written))
    except InputError as e:
        row.update(status="failed", error=e.message if job.url in e.message else f"{job.url}: {e.message}")
    except Exception as e:  # a bug, or a library that choked on this series: the batch goes on
        row.update(status="failed", error=f"{job.url}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    row["seconds"] = round(time.monotonic() - t0, 2)
    if row["status"] != "done":
        row["output"] = ""  # nothing was moved in: a failed series leaves no folder
    return row


def _run(job: SeriesJob) -> list[Path]:
    opts = dict(job.options)
    if job.command == "segment":
        from medfound.infer.incontext import segment_path

        return segment_path(opts.pop("support"), job.url, job.output, progress=False, dicom_seg=True, **opts)
    from medfound.infer.predict import predict_path

    return predict_path(opts.pop("model"), job.url, job.output, dicom_seg=True, progress=False, **opts)


def read_rows(path: Path) -> dict[str, dict]:
    """Series UID -> row of an existing ``batch.csv`` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the batch record: {e}") from None
    if rows and "series_uid" not in rows[0]:
        raise InputError(path, "is not a medfound batch record (no series_uid column)")
    return {r["series_uid"]: r for r in rows}


def plan(query: str, out: Path, command: str, options: dict, push: bool) -> tuple[list[SeriesJob], dict[str, dict]]:
    """(series still to run, rows of the series already done) for ``query`` into ``out``."""
    from medfound.io.dicomweb import NOT_IMAGES, parse, series_in

    if command not in COMMANDS:
        raise InputError(None, f"batch runs {' or '.join(COMMANDS)}, not {command!r}")
    ref = parse(query)
    found = series_in(ref)
    previous = read_rows(out / "batch.csv")
    todo, done = [], {}
    for s in found:
        if s.modality in NOT_IMAGES:
            continue  # results and documents, not images: nothing to segment
        old = previous.get(s.series)
        if old and old.get("status") == "done" and Path(old.get("output", "")).is_dir():
            done[s.series] = old
            continue
        todo.append(SeriesJob(command, s.url(ref), s.series, s.study, s.modality, str(out / s.series), push, options))
    return todo, done


@contextlib.contextmanager
def executor(workers: int, scheduler: str | None) -> Iterator[Executor | None]:
    """None (run here), a pool of ``workers`` local processes, or a Dask cluster's executor."""
    if scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise InputError(None, "--scheduler needs Dask's distributed (pip install 'dask[distributed]')") from None
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise InputError(scheduler, f"cannot reach the Dask scheduler: {e}") from None
        try:
            yield client.get_executor(pure=False)
        finally:
            client.close()
    elif workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    else:
        yield None


def run_batch(query: str, out: str | os.PathLike, command: str, options: dict, push: bool = False,
              workers: int = 1, scheduler: str | None = None, progress: bool = True) -> list[dict]:
    """Run every series ``query`` finds that is not done yet; ``out/batch.csv`` is rewritten after each
    series (atomically), so it always tells where the batch stands. Returns every row."""
    import sys

    from medfound.io.outputs import check_output_dir
    from medfound.progress import Progress

    if workers < 1:
        raise InputError(None, "--workers must be at least 1")
    out = check_output_dir(out, [options.get("support"), options.get("model")])
    todo, rows = plan(query, out, command, options, push)
    out.mkdir(parents=True, exist_ok=True)
    print(f"medfound: batch {command}: {len(todo)} series to run, {len(rows)} done before", file=sys.stderr)

    def record(row: dict) -> None:
        rows[row["series_uid"]] = row
        write_rows(out / "batch.csv", rows.values())
        if row["status"] != "done":
            print(f"medfound: error: {row['error']}", file=sys.stderr, flush=True)

    with Progress(f"batch {command}", len(todo), enabled=progress) as bar, executor(workers, scheduler) as pool:
        if pool is None:
            for job in todo:
                record(run_series(job))
                bar.advance(1, job.series_uid[-12:])
        else:
            futures: dict[Future, SeriesJob] = {pool.submit(run_series, job): job for job in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    row = fut.result()
                except Exception as e:  # the worker itself died (killed, out of memory)
                    row = asdict(job) | {"status": "failed", "seconds": 0.0, "pushed": "", "output": "",
                                         "error": f"{job.url}: worker failed: {type(e).__name__}: {e}"}
                record(row)
                bar.advance(1, job.series_uid[-12:])
    write_rows(out / "batch.csv", rows.values())
    return list(rows.values())


def write_rows(path: Path, rows) -> None:
    """``batch.csv``, header included even before the first series is done."""
    import io

    from medfound.io.atomic import write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.2f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in COLUMNS})
    write_text(path, buf.getvalue())
