"""Progress on the console for every phase of a run: no phase is silent for long.

``Console(log, tty)`` wraps the run's log function. It remembers when it last wrote and which phase the run is in
(``with console.phase("exporting the SavedModel"):``). Long loops report how far they are with
``progress.report(done, total)``: on a terminal that draws a bar with an ETA on one line, rewritten in place; when
piped (a log file, the frontier) it writes a plain line at most every ``every`` seconds. A watchdog thread writes
"<phase> ... still running (N s)" whenever nothing was written for ``every`` seconds, so phases with no loop of ours
to count (TFF tracing a round, TensorFlow saving a model) still show that they are alive.

The library reports through the module-level ``report``; it is a no-op when no console is active (library use,
tests that call the tasks directly).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Optional

_ACTIVE: list["Console"] = []


def report(done: int, total: int, unit: str = "", extra: str = "") -> None:
    """``done`` of ``total`` in the current phase (shown by the active console, if any)."""
    if _ACTIVE:
        _ACTIVE[-1].report(done, total, unit, extra)


def phase(name: str):
    """The active console's phase context (a no-op context without one)."""
    return _ACTIVE[-1].phase(name) if _ACTIVE else contextlib.nullcontext()


def fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Console:
    """The run's log with a phase, a progress line and a watchdog (see the module docstring).

    Args:
      log: writes one line (the run's log function).
      tty: draw bars in place (a terminal); False: periodic plain lines.
      every: seconds of silence before the watchdog speaks, and between plain progress lines.
    """

    def __init__(self, log: Callable[[str], None], tty: bool = False, every: float = 5.0):
        self._log, self.tty, self.every = log, tty, every
        self._lock = threading.RLock()
        self._last = time.monotonic()
        self._phase: Optional[str] = None
        self._phase_start = self._last
        self._bar_shown = False
        self._progress_start: Optional[tuple[float, int]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the log function -------------------------------------------------------------------------------------
    def __call__(self, line: str) -> None:
        with self._lock:
            self._clear_bar()
            self._log(line)
            self._last = time.monotonic()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self._bar_shown = False

    # -- phases -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """The run is in phase ``name`` until the block ends (phases nest; the inner one is shown)."""
        with self._lock:
            outer = (self._phase, self._phase_start, self._progress_start)
            self._phase, self._phase_start, self._progress_start = name, time.monotonic(), None
        try:
            yield self
        finally:
            with self._lock:
                self._clear_bar()
                self._phase, self._phase_start, self._progress_start = outer

    def report(self, done: int, total: int, unit: str = "", extra: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            if self._progress_start is None or done < self._progress_start[1]:
                self._progress_start = (now, done)
            t0, d0 = self._progress_start
            rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
            eta = f"ETA {fmt_secs((total - done) / rate)}" if rate > 0 and done < total else ""
            frac = done / total if total else 1.0
            text = f"{self._phase or 'working'}: {done}/{total}{' ' + unit if unit else ''} ({frac:.0%})"
            if self.tty:
                width = 24
                bar = "#" * int(round(frac * width)) + "." * (width - int(round(frac * width)))
                line = f"{text} [{bar}] {eta} {extra}".rstrip()
                sys.stdout.write("\r\x1b[K" + line)
                sys.stdout.flush()
                self._bar_shown = True
                self._last = now
            elif now - self._last >= self.every or done == total and total and now - self._phase_start >= self.every:
                self(", ".join(x for x in (text, eta, extra) if x))

    # -- the watchdog -----------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 5)):
            with self._lock:
                now = time.monotonic()
                if self._phase and now - self._last >= self.every:
                    line = f"{self._phase} ... still running ({fmt_secs(now - self._phase_start)})"
                    if self.tty:
                        sys.stdout.write("\r\x1b[K" + line)
                        sys.stdout.flush()
                        self._bar_shown = True
                        self._last = now
                    else:
                        self(line)

    def __enter__(self) -> "Console":
        _ACTIVE.append(self)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear_bar()
        _ACTIVE.remove(self)
