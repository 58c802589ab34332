"""Progress of long stages on stderr: a tqdm bar on a terminal, periodic one-line reports otherwise.

A log file or CI console cannot redraw a bar, so when stderr is not a terminal `Progress` prints
`DESC: 120/4912 proteins (37.5 proteins/s, ETA 2:08)` every `every_s` seconds and once at the end.
A stage shorter than that prints nothing; a longer one also reports its final count.
`enabled=False` (the commands' `--no-progress`) prints nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts units of work done: `update(n)`, `set_postfix(dict)`, `write(line)`, `close()`; also a
    context manager, and an iterator over `iterable` (advancing by one per item)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, every_s: float = 30.0,
                 terminal: Optional[bool] = None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.count = self._start_count = initial
        self.enabled, self.every_s = enabled, every_s
        self.postfix: dict = {}
        self._start = self._last_report = time.monotonic()
        self._reported_count = None  # count at the last line printed (line mode)
        self._bar = None
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_report >= self.every_s:
            self._report()

    def set_postfix(self, values: dict) -> None:
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(values)

    def write(self, line: str) -> None:
        """A line on stdout that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._reported_count not in (None, self.count):
            self._report()  # the closing line of a stage long enough to have reported
        self.enabled = False

    def _report(self) -> None:
        self._last_report = now = time.monotonic()
        self._reported_count = self.count
        elapsed = max(now - self._start, 1e-9)
        rate = (self.count - self._start_count) / elapsed
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        eta = f", ETA {_clock((self.total - self.count) / rate)}" if self.total and rate > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        units = _plural(self.unit)
        print(f"{self.desc}: {done} {units} ({rate:.3g} {units}/s, {_clock(elapsed)} elapsed{eta}{extra})",
              file=sys.stderr, flush=True)
