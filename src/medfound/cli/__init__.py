"""``medfound``: one Typer app; each command is a thin call into the library, found in the module
named for its group (``data``, ``train``, ``sam``, ``incontext``, ``experiment``, ``serve``, ``batch``).

Exit codes: 0 success; 2 bad input (one line on stderr naming the file and the problem); 1 a bug.
"""

# ruff: noqa: I001
from __future__ import annotations

import sys

# The groups register their commands on import; this order is the order of `medfound --help`.
from medfound.cli import data  # noqa: F401
from medfound.cli import train  # noqa: F401
from medfound.cli import sam  # noqa: F401
from medfound.cli import incontext  # noqa: F401
from medfound.cli import experiment  # noqa: F401
from medfound.cli import serve  # noqa: F401
from medfound.cli import batch  # noqa: F401
from medfound.cli.common import app
from medfound.errors import InputError

__all__ = ["app", "main"]


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", module="pydicom")  # odd-but-readable tags: not the user's concern
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    import logging

    # Lightning advertises a cloud logger at every training start; its device lines stay
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    from medfound.cli.aliases import canonical_argv

    sys.argv[1:] = canonical_argv(sys.argv[1:])  # older spellings of an option (--out, --steps ...) still work
    try:
        app()
    except InputError as e:
        print(f"medfound: error: {e.message}", file=sys.stderr)
        sys.exit(2)
    except FileExistsError as e:
        print(f"medfound: error: {e}: exists", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("medfound: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
