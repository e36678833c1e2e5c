"""Progress lines through the standard `logging` module.

Every module logs to `logging.getLogger(__name__)`, below the package's logger `mtu_export`. Whoever runs the code
decides where the lines go: the CLI shows them through rich's handler on stderr (display.py), `python -m
mtu_export.ondevice` on plain stderr (`plain_handler`, no rich needed on a device), and a library user sees
warnings only until they configure logging (`logging.basicConfig(level=logging.INFO)` shows everything). No torch
here: the on-device runtime imports this module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = "mtu_export"


class _Prefixed(logging.Formatter):
    """The message as written, with `warning: ` (or `error: `) before anything above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def formatter() -> logging.Formatter:
    return _Prefixed("%(message)s")


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a line is written (a test runner's capture, a redirect made
    after the handler was installed), as logging's last-resort handler does."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def plain_handler() -> logging.Handler:
    """A handler that writes each line to stderr as it is, warnings prefixed."""
    handler = _Stderr()
    handler.setFormatter(formatter())
    return handler


def install(handler: logging.Handler, level: int = logging.INFO) -> None:
    """Show the package's lines from `level` up through `handler`, replacing a handler installed here before (a
    command run twice in one process logs each line once)."""
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if getattr(h, "_mtu_export", False)]:
        logger.removeHandler(old)
    handler._mtu_export = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


@contextmanager
def quiet(name: str = ROOT, level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, `name`'s lines below `level` are dropped (by default its info lines; warnings still show):
    a benchmark that exports as one of its steps; `""` is the root logger, which some libraries log to."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
