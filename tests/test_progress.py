"""covseg.progress: plain tqdm on a terminal; a few whole lines when stderr is a log."""

from __future__ import annotations

import fcntl
import io
import os
import select
import struct
import termios
import time

import pytest

from covseg.progress import LOG_INTERVAL_S, progress


def test_a_long_loop_writes_a_few_lines_to_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal, like `make run > log`
    monkeypatch.setattr("sys.stderr", log)
    for _ in progress(range(20_000), desc="lungs", unit="slice"):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 1 <= len(lines) <= 3, lines  # start and end (and a refresh if the loop outlasts the interval)
    assert lines[-1].startswith("lungs: 100%") and "20000/20000" in lines[-1]


def test_an_epoch_loop_writes_one_line_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress(range(5), desc="segment", unit="epoch")
    for epoch in bar:
        bar.set_postfix(loss=1.0 / (epoch + 1))  # what covseg.training.fit does after each epoch
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 5, lines  # the 0/5 line, then one per epoch with its count and its loss
    assert [(f"{k}/5" in line, f"loss={1.0 / k:.3g}" in line) for k, line in enumerate(lines[1:], 1)] == [
        (True, True)
    ] * 5, lines


def test_a_terminal_gets_tqdm_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr("sys.stderr", tty)
        bar = progress(range(3), desc="grad-cam")
        assert bar.mininterval < LOG_INTERVAL_S and bar.fp is not None
        for _ in bar:
            time.sleep(0.01)
        bar.close()
        tty.flush()
        written = b""
        while select.select([master], [], [], 0.5)[0]:
            written += os.read(master, 65536)
    os.close(master)
    written = written.decode()
    assert "\r" in written and "grad-cam: 100%" in written
