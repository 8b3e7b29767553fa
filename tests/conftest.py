import os
import sys
import warnings
from pathlib import Path

# Under pytest-xdist each worker gets its share of the cores (set before numpy and torch load, and
# inherited by the CLI subprocesses the tests start): a worker per core, each with every core's
# threads, oversubscribes the machine and ran the suite a third slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

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


def run_cli(*args: str, cwd=None, timeout: float = 600):
    """Run ``medfound ARGS`` in a subprocess, as a user would."""
    import subprocess

    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "medfound", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def run_cli_here(*args: str):
    """``medfound ARGS`` inside the test process, for calls that stop on bad input: the same ``main``
    (exit code, stderr, no traceback: an uncaught exception fails the test) without a fresh
    interpreter importing torch, MONAI and Lightning again, which costs seconds a call."""
    import contextlib
    import io
    import subprocess

    from medfound.cli import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = ["medfound", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_here():
    return run_cli_here
