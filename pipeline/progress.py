"""Progress a person can read: one bar per job stage in a terminal, one line every few seconds in a log.

``Progress`` picks by where its stream goes: a TTY gets one tqdm bar; anything else (a file, a pipe, the
log of a Ray job) gets no bar, only a line logged at INFO on ``deepfill.progress`` at most every
``interval_s`` seconds (default: ``$DEEPFILL_PROGRESS_INTERVAL_S`` or 10) and a final line on close::

    prepare: 120/1000 images (12%), 31.2 images/s, eta 28s
    prepare: 1000 images in 32.1s

``quiet_ray_data`` turns Ray Data's own progress bars off (outside a terminal they are redrawn as
thousands of text lines); ``pipeline.cluster.connect`` calls it, so every job gets it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "DEEPFILL_PROGRESS_INTERVAL_S"
LOGGER_NAME = "deepfill.progress"


def _default_interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL_S


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    """``28s``, ``4m05s``, ``2h03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Count work done in one job stage and show it: a tqdm bar on a TTY, a periodic log line otherwise.

    ``desc`` names the stage (``"prepare"``), ``total`` the expected count (None: unknown), ``unit`` what is
    counted (``"images"``). ``interval_s``: least seconds between two log lines (0: one per update).
    ``stream``: where a bar would go and whose ``isatty()`` decides (default ``sys.stderr``). ``logger``:
    where the lines go (default ``logging.getLogger("deepfill.progress")``; when no handler is set up
    anywhere, as in a bare script, they are written to ``stream`` instead). ``enabled=False`` shows
    nothing at all. Use it as a context manager, or call ``close()``; ``update`` takes the lock and, in log
    mode, reads the clock: no logging call unless the interval has passed.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", *, interval_s: float | None = None,
                 stream=None, logger: logging.Logger | None = None, enabled: bool = True):
        self.desc = str(desc)
        self.total = None if total is None else int(total)
        self.unit = str(unit)
        self.n = 0
        self.interval_s = _default_interval() if interval_s is None else max(0.0, float(interval_s))
        self._stream = sys.stderr if stream is None else stream
        self._log = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self._enabled = bool(enabled)
        self._postfix = ""
        self._lock = threading.Lock()
        self._closed = False
        self._t0 = time.monotonic()
        self._next_line = self._t0 + self.interval_s
        self._bar = None
        if self._enabled and _is_tty(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self._stream,
                             dynamic_ncols=True)

    @property
    def is_bar(self) -> bool:
        """True when this shows a tqdm bar (the stream is a TTY), False when it logs lines."""
        return self._bar is not None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done."""
        if not self._enabled:
            return
        with self._lock:
            if self._closed:
                return
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.monotonic()
            if now < self._next_line:
                return
            self._next_line = now + self.interval_s
            line = self._line(now)
        self._emit(line)

    def set_postfix(self, text: str) -> None:
        """Extra text after the counts (on the bar, or at the end of the next log line)."""
        if not self._enabled:
            return
        with self._lock:
            self._postfix = str(text)
            if self._bar is not None and not self._closed:
                self._bar.set_postfix_str(self._postfix, refresh=False)

    def close(self) -> None:
        """Finish: close the bar, or log the final line (``prepare: 1000 images in 32.1s``). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._enabled:
                return
            if self._bar is not None:
                self._bar.close()
                return
            elapsed = time.monotonic() - self._t0
            done = f"{self.n}/{self.total}" if self.total is not None and self.n != self.total else f"{self.n}"
            line = f"{self.desc}: {done} {self.unit} in {elapsed:.1f}s"
        self._emit(line)

    def _emit(self, line: str) -> None:
        if self._log.hasHandlers():
            self._log.info("%s", line)
            return
        try:  # logging was never set up (a bare script): the line would vanish, so write it to the stream
            self._stream.write(line + "\n")
            self._stream.flush()
        except (AttributeError, ValueError, OSError):
            pass

    def _line(self, now: float) -> str:
        elapsed = now - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total is not None:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit}"
            if self.total > 0:
                text += f" ({100.0 * self.n / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {self.n} {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total is not None and rate > 0 and self.n < self.total:
            text += f", eta {_duration((self.total - self.n) / rate)}"
        if self._postfix:
            text += f" [{self._postfix}]"
        return text

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_ray_data() -> None:
    """Turn off Ray Data's own progress bars for every dataset created after this call in this process.

    A dataset copies the current DataContext when it is created and carries it along: the executor that
    runs it (in the driver, or in the SplitCoordinator actor Ray Train uses to feed its workers) reads the
    progress-bar switches from that copy. Datasets created before the call keep their bars.
    Needs no running Ray.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # off: no global, operator, tqdm, rich or logged progress at all
    ctx.enable_operator_progress_bars = False
    ctx.enable_rich_progress_bars = False
    try:  # Ray Data warns once per process that bars are disabled; we did it on purpose
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")
    except Exception:  # noqa: BLE001 - only a cosmetic warning is at stake
        pass
