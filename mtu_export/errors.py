"""Errors the user can act on. Every message says what was expected, what was found and how to fix it.

The CLI prints `error: <message>` on one line and exits with the subclass's `exit_code` (1 MtuError, 2 input,
3 config, 4 checkpoint, 5 output exists, 6 drift, 7 `bench --check` violations, 8 disk full); nothing here
imports anything else from the package.
"""

from __future__ import annotations


class MtuError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class InputError(MtuError):
    """A path, file or folder given by the user is missing, unreadable or of the wrong kind."""

    exit_code = 2


class ConfigError(MtuError):
    """An option, task list or recipe value is invalid."""

    exit_code = 3


class CheckpointError(MtuError):
    """A checkpoint's config and weights disagree, or the files are corrupt."""

    exit_code = 4


class OutputExistsError(MtuError):
    """The output path exists and `--overwrite` was not given."""

    exit_code = 5


class DriftError(MtuError):
    """A transformed model (folded, exported) drifts from its reference beyond tolerance."""

    exit_code = 6


class BenchGateError(MtuError):
    """A bench result violates its CI baseline (`bench --check`); `problems` lists every violation."""

    exit_code = 7

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class DiskFullError(MtuError):
    """The disk (or quota) filled up while an output was written; nothing half-written is left behind."""

    exit_code = 8
