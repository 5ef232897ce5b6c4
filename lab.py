#!/usr/bin/env python
"""Open loralab's notebooks in JupyterLab, from this environment, with the project's settings.

    python lab.py                     # then open the printed http://127.0.0.1:8888/lab?token=... address
    python lab.py --no-browser --port 8899   # any `jupyter lab` option passes through (and wins)

What it sets, for this command only (nothing is written to your home folder's Jupyter settings):

* the file browser shows notebooks/; a double-click opens a notebook's .py as a notebook
  (jupytext's "Jupytext Notebook" viewer, lab/overrides.json). The library's modules under lib/
  are not reachable from there: JupyterLab picks a viewer by file type (.py) and file name, never
  by folder, so a .py under lib/ would open as a notebook too. A plain `jupyter lab` keeps
  JupyterLab's defaults (every .py opens as text);
* saving writes the .py back (jupytext; no .ipynb beside it) and checkpoints go to a folder in the
  system's temporary directory, not to notebooks/.ipynb_checkpoints;
* no news feed and no update check (the machine may be offline; nothing reaches outside it);
* as root (a container, a CI machine), --allow-root: Jupyter refuses to start as root without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent


def checkpoint_dir() -> Path:
    """One folder per clone (JupyterLab names checkpoints by file name only when the folder is absolute)."""
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:10]
    user = os.environ.get("USER") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"loralab-lab-checkpoints-{user}-{tag}"


ALIASES = {"--ServerApp.root_dir": ("--notebook-dir", "--ServerApp.notebook_dir")}


def lab_args(argv: list[str] = ()) -> list[str]:
    """The options that make `jupyter lab` open loralab's notebooks, less those that argv sets itself
    (Jupyter refuses an option given twice)."""
    defaults = [
        f"--ServerApp.root_dir={REPO / 'notebooks'}",
        f"--LabApp.app_settings_dir={REPO / 'lab'}",
        f"--FileCheckpoints.checkpoint_dir={checkpoint_dir()}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI machines: Jupyter refuses root without it
        defaults.append("--allow-root")

    def given(option: str) -> bool:
        return any(a == o or a.startswith(o + "=") for a in argv for o in (option, *ALIASES.get(option, ())))

    return [d for d in defaults if not given(d.split("=", 1)[0])]


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    for mod in ("jupyterlab", "jupytext"):
        if importlib.util.find_spec(mod) is None:
            print(f"lab.py: {mod} is not installed in {sys.prefix}: run `bash setup.sh` "
                  f"(or `pip install -e '.[lab]'`)", file=sys.stderr)
            return 2
    cmd = [sys.executable, "-m", "jupyterlab", *lab_args(argv), *argv]
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
