import os
import sys
import warnings
from pathlib import Path

# Under pytest-xdist each CLI call a test makes gets its worker's share of the cores (set before
# numpy and torch load, and inherited by the CLI processes): a worker per core, each with every
# core's threads, oversubscribes the machine and ran the suite a third slower. The worker's own torch
# stays on one thread, so that CLI calls can be forked from it (see ``_can_fork``).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
    if sys.platform == "linux":
        import torch

        torch.set_num_threads(1)

import pytest

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    """Real sample data materialised once per test worker (all parts but the big atlas sets)."""
    from medfound.data.samples import materialise_samples

    out = tmp_path_factory.mktemp("samples")
    materialise_samples(out, ("tissue", "lesions", "phantoms", "pool"), progress=False)
    return out


@pytest.fixture(scope="session")
def pydicom_files() -> dict[str, Path]:
    """Name -> path of pydicom's and pydicom-data's real test files."""
    import importlib.util

    roots = []
    for mod in ("pydicom", "data_store"):
        spec = importlib.util.find_spec(mod)
        base = Path(list(spec.submodule_search_locations)[0])
        roots.append(base / ("data/test_files" if mod == "pydicom" else "data"))
    return {f.name: f for r in roots for f in r.iterdir() if f.suffix == ".dcm"}


@pytest.fixture
def oblique_ct():
    from medfound.data.phantoms import make_phantom

    image, label = make_phantom("CT", shape=(40, 36, 12), seed=3, oblique=True)
    return image, label


def run_cli_subprocess(*args: str, cwd=None, env: dict | None = None, timeout: float = 600):
    """Run ``medfound ARGS`` in a fresh interpreter, exactly as a user would (``env``: variables added
    to this process's environment)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "medfound", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ) | (env or {}), timeout=timeout)


# Libraries every training or scoring command imports; a fresh interpreter spends 10-15 s on them
# (MONAI loads all its submodules, transformers' BERT among them), often longer than the command's work.
_HEAVY = ("torch", "numpy", "scipy.ndimage", "monai", "lightning.pytorch", "peft", "nibabel", "pydicom",
          "SimpleITK", "safetensors.torch", "matplotlib.pyplot", "medfound.cli")


def _can_fork() -> bool:
    """A forked child may run torch only where the parent never started an OpenMP team: GNU OpenMP's
    thread pool does not survive ``fork`` (the child hangs in its first parallel region). A pytest-xdist
    worker on Linux keeps torch on one thread, so it never starts one; its children start their own."""
    if sys.platform != "linux" or not os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        return False
    import torch

    return torch.get_num_threads() == 1


def run_cli(*args: str, cwd=None, env: dict | None = None, timeout: float = 600):
    """Run ``medfound ARGS`` in a separate process, as a user would: its own argv, cwd, environment,
    stdout and stderr (file descriptors 1 and 2), exit code and crash, none of it reaching the tests.

    The process is forked from this test worker once the libraries are imported here, so each call
    skips the interpreter start and the imports: ``medfound.cli.main`` runs as under ``python -m
    medfound``. Where forking is not safe (see ``_can_fork``) it is a fresh interpreter instead;
    ``run_cli_subprocess`` always is one, for the checks that are about the interpreter start itself.
    """
    import importlib
    import subprocess
    import tempfile
    import time

    if not _can_fork():
        return run_cli_subprocess(*args, cwd=cwd, env=env, timeout=timeout)
    for name in _HEAVY:
        importlib.import_module(name)
    argv = ["medfound", *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            _run_main_and_exit(argv, cwd, env, out.fileno(), err.fileno())
        deadline, status = time.monotonic() + timeout, None
        try:
            while status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                elif time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
                else:
                    time.sleep(0.02)
        finally:
            if status is None:  # timed out, or the test was stopped (pytest-timeout): no orphan left running
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), *texts)


def _run_main_and_exit(argv: list[str], cwd, env: dict | None, out_fd: int, err_fd: int) -> None:
    """In a forked child: point fds 1 and 2 (and Python's streams and log handlers) at the capture
    files, run ``main`` and leave with its exit code as the interpreter would, shutting down the
    worker processes and threads this process started, but none of the test worker's: its exit
    handlers (which would tidy its temporary folders) and its children are not this process's."""
    import atexit
    import concurrent.futures.process
    import concurrent.futures.thread
    import logging
    import multiprocessing.process
    import multiprocessing.util
    import threading
    import traceback

    multiprocessing.process._children = set()  # as multiprocessing resets it in a process it forks
    concurrent.futures.process._threads_wakeups.clear()
    concurrent.futures.thread._threads_queues.clear()
    atexit._clear()
    atexit.register(logging.shutdown)
    atexit.register(multiprocessing.util._exit_function)
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # never the worker's stdin (its link to pytest)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = open(0, closefd=False)
        old = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", closefd=False)
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for h in getattr(logger, "handlers", []):
                if isinstance(h, logging.StreamHandler) and h.stream in old:
                    h.setStream(sys.stderr if h.stream in (old[1], old[3]) else sys.stdout)
        os.environ.update(env or {})
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # the worker's share of the cores
        if cwd is not None:
            os.chdir(cwd)
        import importlib.util

        from medfound.cli import main

        # argv[0] as `python -m medfound` sets it: Lightning's DDP launcher starts the other ranks from it
        sys.argv = [importlib.util.find_spec("medfound.__main__").origin, *argv[1:]]

        try:
            main()
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()  # joins this process's threads; stops its process pools
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@pytest.fixture
def cli():
    return run_cli
