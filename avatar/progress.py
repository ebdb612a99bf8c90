"""Progress reporting without printing from library code.

Long library functions accept ``progress: Progress | None``. They call it as
``progress(step, done, total)`` whenever work advances; ``total`` may be ``None`` when unknown.
The command line supplies a callback that draws progress bars on a terminal and plain log lines
elsewhere; Python users may pass their own or nothing. A callback may also offer a
``status(step, text)`` method: long loops (training) call it with a short status such as the
current loss and PSNR, shown beside the bar.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

Progress = Callable[[str, int, Optional[int]], None]
T = TypeVar("T")

log = logging.getLogger(__name__)


def null_progress(step: str, done: int, total: Optional[int]) -> None:
    """A progress callback that does nothing."""


def report_status(progress: Optional[Progress], step: str, text: str) -> None:
    """Pass a one-line status to ``progress`` if it shows statuses (see the module docstring)."""
    show = getattr(progress, "status", None)
    if callable(show):
        show(step, text)


def track(
    items: Iterable[T], step: str, total: Optional[int], progress: Optional[Progress]
) -> Iterator[T]:
    """Yield from ``items``, reporting each one to ``progress`` under the name ``step``."""
    report = progress or null_progress
    done = 0
    report(step, 0, total)
    for item in items:
        yield item
        done += 1
        report(step, done, total)
    if total is not None and done != total:
        report(step, done, done)


class ConsoleProgress:
    """Progress bars (tqdm) on a terminal; a log line every few seconds otherwise."""

    def __init__(self, stream=None, log_every_s: float = 5.0):
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self._bars: dict[str, object] = {}
        self._last_log: dict[str, float] = {}
        self._status: dict[str, str] = {}

    def status(self, step: str, text: str) -> None:
        """Show ``text`` beside the bar of ``step`` (and in its log lines)."""
        self._status[step] = text
        bar = self._bars.get(step)
        if bar is not None:
            bar.set_postfix_str(text, refresh=False)

    def __call__(self, step: str, done: int, total: Optional[int]) -> None:
        if self.interactive:
            self._bar(step, done, total)
        else:
            self._log(step, done, total)

    def _bar(self, step: str, done: int, total: Optional[int]) -> None:
        from tqdm import tqdm

        bar = self._bars.get(step)
        if bar is None:
            bar = tqdm(total=total, desc=step, file=self.stream, dynamic_ncols=True, leave=True)
            self._bars[step] = bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            self._bars.pop(step, None)

    def _log(self, step: str, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        last = self._last_log.get(step)
        if last is not None and not finished and now - last < self.log_every_s:
            return
        self._last_log[step] = now
        of = f"/{total}" if total is not None else ""
        extra = f"  {self._status[step]}" if self._status.get(step) else ""
        print(f"[{step}] {done}{of}{extra}", file=self.stream, flush=True)
        if finished:
            self._last_log.pop(step, None)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
