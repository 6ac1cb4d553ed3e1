"""Progress output that suits where it goes: bars on a terminal, one line per step in a log.

tqdm redraws its bar with carriage returns; written to a file (``dvc repro > log``, CI) every
redraw is kept, hundreds of lines' worth a stage. So a bar draws only when stderr (tqdm's
output) is a terminal. Elsewhere it still counts, silently, and says once, when it closes, what
it did: "backbone features: 250 images in 3.1 s". Under DDP only rank 0 reports.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


def interactive() -> bool:
    """Whether stderr, where tqdm draws, is a terminal (not a file, a pipe or a capture)."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or a minimal stream
        return False


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a single process: runtime.is_main_process's rule (torchrun's
    RANK), read here without importing torch so that light modules can report progress."""
    return int(os.environ.get("RANK", 0)) == 0


def note(message: str) -> None:
    """One log line on stdout (rank 0 only), written around any bars on the terminal; flushed,
    so that it keeps its place among stderr's lines in a piped log."""
    if is_main_process():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class Progress(tqdm):
    """A tqdm bar on a terminal. Elsewhere it draws nothing (``delay=inf``: tqdm counts but
    never displays) and, if ``summary``, prints one line when it closes. Other ranks than 0
    are silent. ``unit`` is singular ("image"); the summary line adds the plural's "s"."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, *,
                 summary: bool = True, **kwargs: object) -> None:
        self.quiet = not interactive()
        main = is_main_process()
        self._summary = summary and self.quiet and main and not kwargs.get("disable", False)
        if self.quiet:
            kwargs["delay"] = math.inf
        kwargs["disable"] = bool(kwargs.get("disable", False)) or not main
        super().__init__(iterable, desc=desc, **kwargs)

    def display(self, *args: object, **kwargs: object) -> bool | None:
        # tqdm's monitor thread may force a redraw past ``delay``; a log never gets one.
        return False if self.quiet else super().display(*args, **kwargs)

    def clear(self, *args: object, **kwargs: object) -> None:
        # tqdm.write clears bars with a "\r" first; a bar that never drew has nothing to clear.
        if not self.quiet:
            super().clear(*args, **kwargs)

    def close(self) -> None:
        if self._summary and not self.disable:
            self._summary = False  # close() runs again from __del__
            line = self.summary_line()
            super().close()
            note(line)
        else:
            super().close()

    def summary_line(self) -> str:
        """'desc: 250 images in 3.1 s', or '... 30/250 images ...' when it stopped short."""
        unit = self.unit if self.n == 1 or not self.unit.isalpha() else f"{self.unit}s"
        done = f"{self.n}/{self.total}" if self.total is not None and self.n < self.total \
            else f"{self.n}"
        elapsed = self._time() - self.start_t
        return f"{self.desc or 'done'}: {done} {unit} in {elapsed:.1f} s"
