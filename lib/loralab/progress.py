"""Progress of a long phase, where a person can see it: a bar when someone watches, plain lines in logs.

``Progress(total, "training bs 4")`` shows a tqdm bar on a terminal and in JupyterLab (tqdm.auto: a
widget there), and plain lines at most every ``every_s`` seconds when output goes to a file or to a
notebook nobody watches (papermill), so logs stay readable. ``LORALAB_PROGRESS`` = "bar", "lines" or
"off" chooses explicitly. Every line (and every ``every_s`` seconds in bar mode) is also appended to
``$LORALAB_PROGRESS_FILE`` when set: ``run_all.py`` sets it and prints those lines on its console while a
notebook runs, so a sweep of hours shows step, loss, tokens/s, peak memory and time left.
"""

from __future__ import annotations

import os
import sys
import time


def _mode() -> str:
    m = os.environ.get("LORALAB_PROGRESS", "")
    if m in ("bar", "lines", "off"):
        return m
    return "bar" if sys.stdout.isatty() or "ipykernel" in sys.modules else "lines"


def _clock(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def note(line: str) -> None:
    """One line where the person running loralab sees it: this output and the runner's console."""
    print(line, flush=True)
    path = os.environ.get("LORALAB_PROGRESS_FILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line.rstrip("\n") + "\n")
        except OSError:  # progress must never break the work it reports
            pass


class Progress:
    """Progress through ``total`` units of a phase; ``update(n, **figures)`` after each unit."""

    def __init__(self, total: int, desc: str, unit: str = "step", every_s: float = 10.0, initial: int = 0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.figures = initial, {}
        self.mode = _mode()
        self.t0 = self.last = time.monotonic()
        self.start_n = initial
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
        self._file_line(force=True)
        if self.mode == "lines":
            print(self.line(), flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start_n
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        figs = "".join(f" | {k} {v}" for k, v in self.figures.items())
        eta = ""
        if done > 0 and self.total:
            eta = f", ETA {_clock(elapsed / done * (self.total - self.n))}"
        return f"{self.desc}: {self.unit} {self.n}/{self.total}{pct}{figs} | {_clock(elapsed)} elapsed{eta}"

    def _file_line(self, force: bool = False) -> None:
        path = os.environ.get("LORALAB_PROGRESS_FILE")
        if path and (force or time.monotonic() - self.last >= self.every_s):
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(self.line() + "\n")
            except OSError:
                pass

    def update(self, n: int = 1, **figures) -> None:
        self.n += n
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(f"{k} {v}" for k, v in self.figures.items()), refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            if self.mode == "lines":
                print(self.line(), flush=True)
            self._file_line(force=True)
            self.last = now

    def close(self, final: str | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if final:
            note(f"{self.desc}: {final}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
