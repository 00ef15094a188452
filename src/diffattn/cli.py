"""The ``diffattn`` command line: a thin dispatcher over one module per subcommand.

Each subcommand lives beside the code it drives (``diffattn/<stage>/cli.py``) and exposes ``DESCRIPTION`` and
``add_arguments(parser)``, which sets ``func(args) -> int``; :data:`SUBCOMMANDS` names them with their help line,
and only the chosen command's module is imported.
Errors: bad input (``ValueError``, ``FileNotFoundError``, ``UsageError``) prints one line naming the
problem and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import sys

from ._version import __version__
from .utils.errors import RunError, UsageError  # noqa: F401  (UsageError: re-exported for users)

_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE}

# subcommand -> (where it lives, one-line help). "module" provides DESCRIPTION (and optionally EPILOG) and
# add_arguments(parser); "module:name" provides NAME_DESCRIPTION and add_name_arguments (two commands, one module).
# Only the chosen command's module is imported: `diffattn --help` and start-up stay fast (no torch to list them).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("diffattn.info", "show a resolved model configuration and its parameter counts"),
    "export": ("diffattn.hf.cli_export", "export a checkpoint to a stock transformers model (DiffLlama / Llama)"),
    "import": ("diffattn.hf.cli_import", "import a transformers DiffLlama / Llama model as a diffattn checkpoint"),
    "data": ("diffattn.data.cli", "prepare corpora, tokenizers and token shards"),
    "generate": ("diffattn.generate_cli", "generate text from a model directory"),
    "eval": ("diffattn.eval.cli", "evaluate a model directory (diffattn or Hugging Face) on one task"),
    "train": ("diffattn.train.cli", "train a model (TOML run file, --set overrides, --resume, torchrun DDP/FSDP2)"),
    "bench": ("diffattn.bench.cli", "benchmark the variants against the standard baseline"),
    "adapt": ("diffattn.dex.cli", "adapt a pretrained LLM with differential attention (DEX)"),
    "compare": ("diffattn.experiments.cli:compare",
                "train every variant parameter-matched on the same data, evaluate, report"),
    "report": ("diffattn.experiments.cli:report", "regenerate a compare report from its results.json"),
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
        if word in ("-h", "--help", "--version"):
            return None
    return None


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``diffattn`` parser. ``command``: build that subcommand's full parser and list the others by their
    help line only (None: list them all, importing nothing); the default ``"*"`` builds every one in full."""
    parser = argparse.ArgumentParser(prog="diffattn", description="The differential-attention family of Transformers.")
    parser.add_argument("--version", action="version", version=f"diffattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_) in SUBCOMMANDS.items():
        if command == "*" or name == command:
            module, _, part = target.partition(":")
            mod, pre = importlib.import_module(module), f"{part.upper()}_" if part else ""
            p = sub.add_parser(name, help=help_, description=getattr(mod, f"{pre}DESCRIPTION", None),
                               epilog=getattr(mod, f"{pre}EPILOG", None))
            getattr(mod, f"add_{part}_arguments" if part else "add_arguments")(p)
        else:
            sub.add_parser(name, help=help_)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Print Python warnings raised under a command as one clean line each (no source line, no path): a
    training alarm reads ``diffattn train: alarm: step 120: grad norm 9.1 > 8 x running median 1.1``.
    Only the text is changed (``warnings.formatwarning``), so filters and recorders still see every warning."""
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        # train.faults.TrainingAlarm, by name: importing the training package here would cost every command ~1 s
        kind = "alarm" if any(c.__name__ == "TrainingAlarm" for c in category.__mro__) else "warning"
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        return f"diffattn {command}: {kind}: {text}\n"

    saved, warnings.formatwarning = warnings.formatwarning, fmt
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
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
