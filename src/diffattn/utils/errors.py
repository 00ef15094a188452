"""Error types the ``diffattn`` command line reports as one line (no traceback), see docs/reliability.md.

* :class:`RunError` — a run failed for a reason that is not the user's input (disk full, an
  unwritable checkpoint directory, too many non-finite steps): one line, exit code ``exit_code``
  (1 by default, 3 for numerical faults). What was written before the failure is intact.
* :class:`CorruptFileError` — a file on disk does not match its recorded checksum or cannot be
  parsed; a ``ValueError``, so the command line reports it like bad input (exit code 2).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2 (``diffattn.cli`` re-exports it)."""


class RunError(RuntimeError):
    """A run stopped cleanly on a fault; ``diffattn`` prints the message and exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CorruptFileError(ValueError):
    """A file whose bytes are not what was written (checksum mismatch, truncation); names the file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def check_text(value: str, what: str) -> str:
    """``value`` if it is valid Unicode text; a command-line argument that was not UTF-8 arrives with lone
    surrogates (Python's surrogateescape) and raises ``ValueError`` naming ``what`` instead of failing later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    return value


__all__ = ["UsageError", "RunError", "CorruptFileError", "check_text"]
