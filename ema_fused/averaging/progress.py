"""A progress bar over tensors and bytes for the streamed average (the command line's).

On a terminal it redraws one line in place; into a file or a pipe (logs, CI) it writes a
line each time another tenth of the bytes has been read, and the last one, so a log
shows progress without a line per tensor.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

GiB = float(2 ** 30)


class ProgressBar:
    """``on_tensor(tensors done, tensors in all, bytes read, bytes to read)`` that draws
    ``[#####-----]  34/68 tensors, 1.20/2.31 GiB read, 0.85 GiB/s``."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.label, self.width = label, width
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.shown = -1  # the tenth of the bytes last written (not on a terminal)
        self.tensors = self.bytes = 0

    def __call__(self, done: int, total: int, read: int, to_read: int) -> None:
        self.tensors, self.bytes = done, read
        frac = read / to_read if to_read else done / max(total, 1)
        filled = min(self.width, int(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"{self.label}: [{bar}] {done:>{len(str(total))}}/{total} tensors, "
                f"{read / GiB:.2f}/{to_read / GiB:.2f} GiB read, {self.rate():.2f} GiB/s")
        if self.live:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        elif int(frac * 10) > self.shown or done >= total:
            self.shown = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()

    def seconds(self) -> float:
        """Seconds since the bar was made."""
        return time.perf_counter() - self.start

    def rate(self) -> float:
        """GiB read per second so far."""
        return self.bytes / GiB / max(self.seconds(), 1e-9)
