"""Progress bars that stay readable in logs.

On a terminal :func:`progress` is plain tqdm. When stderr is not a terminal (``make run > log``, CI, a
Kubernetes pod) every refresh is one line ending in a newline instead of a carriage-return redraw, and
there are few of them: a bar over epochs (``unit="epoch"``: the training loops) prints one line per epoch,
with the epoch's postfix (loss ...); any other bar at most one every :data:`LOG_INTERVAL_S` seconds, so a
loop over thousands of slices prints a handful of lines instead of thousands.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LOG_INTERVAL_S = 30.0
"""Seconds between two lines of a bar (other than an epoch bar) that writes to a log."""


class _LineWriter:
    """A stream for tqdm that turns each carriage-return redraw into one line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:  # a bare newline or a clearing redraw adds nothing to a log
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A tqdm bar for a log: one line per step, never a line for a postfix alone.

    A new postfix waits for the step's line instead of printing a line of its own, and the same step is not
    printed twice (tqdm redraws the last one when it closes).
    """

    _shown: tuple[int, str] | None = None

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        step = (self.n, self.postfix or "")
        if msg is None and step == self._shown:
            return True
        self._shown = step
        return super().display(msg, pos)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``; one line per epoch, or few lines, when the stream is not a terminal.

    The stream is ``kwargs["file"]`` or stderr. Arguments the caller gives (``mininterval``, ``disable``...)
    win over these defaults.
    """
    stream = kwargs.get("file") or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, **kwargs)
    if kwargs.get("unit") == "epoch":
        kwargs.setdefault("mininterval", 0)
        kwargs.setdefault("miniters", 1)
    else:
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)  # tqdm's monitor thread would refresh every 10 s
    kwargs["file"] = _LineWriter(stream)
    return _LogBar(iterable, **kwargs)
