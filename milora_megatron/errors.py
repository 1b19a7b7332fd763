"""The errors a user can act on, and only those.

A ``UserError`` is raised where the cause is the user's input or environment (a config key,
a data record, a folder, a checkpoint file, a full disk): the command-line tools print it as
one line, from one rank, with no traceback. Anything else is a bug and keeps its traceback,
so a ``KeyError`` deep inside never looks like a user's mistake.

Each kind also derives from the built-in exception that describes it (``ValueError``,
``FileNotFoundError``, ...), so callers that catch those keep working.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Something the user can fix; ``exit_code`` is what a command-line tool exits with."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config key, override or command-line value that cannot be used."""


class DataError(UserError, ValueError):
    """A data file or record that cannot be trained or evaluated on (names the file and line)."""


class CheckpointError(UserError, ValueError):
    """A base or adapter checkpoint that is damaged, incomplete, of another model, or not one."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a checkpoint records) is not there."""


class OutputError(UserError, OSError):
    """An output that cannot be written: it exists, its parent is a file or not writable."""


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used as asked (in use, not a run's, unusable checkpoints, a
    change a resume cannot honour)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output is there already and replacing it was not asked for."""


class DiskFullError(UserError, OSError):
    """No space left on the device being written; what was already on disk is untouched."""

    def __init__(self, path: str):
        super().__init__(f"{path}: no space left on device (free space there and rerun; nothing already saved "
                         "was touched)")
        self.path = path


class TrainingStopped(UserError):
    """The run stopped itself (a non-finite loss, diverged factors): the settings need changing."""

    exit_code = 1


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ENOSPC: OSError's errno, or the text libraries
    that do not raise OSError (safetensors' Rust writer) put in their message."""
    for e in _chain(exc):
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
    return False


def as_user_error(exc: BaseException, path: str | None = None) -> BaseException:
    """``exc`` as the user error it stands for (a full disk becomes DiskFullError naming
    ``path``, or the file the OS named), or ``exc`` itself."""
    if isinstance(exc, UserError):
        return exc
    if is_disk_full(exc):
        named = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        return DiskFullError(path or named or "the output")
    return exc


def exit_with(exc: BaseException, tool: str, path: str | None = None) -> int:
    """For a command-line tool's ``except Exception``: a user error (a full disk among them,
    ``path`` naming what was being written) printed as one line, ``<tool>: error: ...``, and
    its exit code returned; anything else re-raised with its own traceback (a bug)."""
    import sys

    error = as_user_error(exc, path)
    if not isinstance(error, UserError):
        raise exc
    print(f"{tool}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
    return error.exit_code
