"""The ``diffattn`` command line: a thin dispatcher over one module per subcommand.

Each subcommand lives beside the code it drives (``diffattn/<stage>/cli.py``) and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func(args) -> int``.
Errors: bad input (``ValueError``, ``FileNotFoundError``, ``UsageError``) prints one line naming the
problem and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import sys

from . import __version__
from .utils.errors import RunError, UsageError  # noqa: F401  (UsageError: re-exported for users)

_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE}

# subcommand -> "module" providing add_parser(subparsers), or "module:function"
SUBCOMMANDS: dict[str, str] = {
    "info": "diffattn.info",
    "export": "diffattn.hf.cli_export",
    "import": "diffattn.hf.cli_import",
    "data": "diffattn.data.cli",
    "generate": "diffattn.generate_cli",
    "eval": "diffattn.eval.cli",
    "train": "diffattn.train.cli",
    "bench": "diffattn.bench.cli",
    "adapt": "diffattn.dex.cli",
    "compare": "diffattn.experiments.cli:add_compare_parser",
    "report": "diffattn.experiments.cli:add_report_parser",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn", description="The differential-attention family of Transformers.")
    parser.add_argument("--version", action="version", version=f"diffattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in SUBCOMMANDS.items():
        module, _, func = target.partition(":")  # "module" or "module:function" (default add_parser)
        getattr(importlib.import_module(module), func or "add_parser")(sub)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Print Python warnings raised under a command as one clean line each (no source line, no path): a
    training alarm reads ``diffattn train: alarm: step 120: grad norm 9.1 > 8 x running median 1.1``.
    Only the text is changed (``warnings.formatwarning``), so filters and recorders still see every warning."""
    import warnings

    from .train.faults import TrainingAlarm

    def fmt(message, category, filename, lineno, line=None):
        kind = "alarm" if issubclass(category, TrainingAlarm) else "warning"
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        return f"diffattn {command}: {kind}: {text}\n"

    saved, warnings.formatwarning = warnings.formatwarning, fmt
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"diffattn {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RunError as e:  # a run stopped cleanly on a fault (disk full, non-finite steps): docs/reliability.md
        print(f"diffattn {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the environment failed (disk full, read-only or vanished storage): one line, exit 1
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"diffattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
