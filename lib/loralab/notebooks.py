"""Executing one notebook: papermill (a fresh kernel, so a fresh CUDA context per notebook) into the run folder,
then its HTML report.

Each executed notebook goes to a hidden ``.<name>.partial.ipynb``, renamed to ``<name>.ipynb`` when the notebook
ends (a cell's error included: the notebook shows it), then its ``.html`` (``RunFolder.notebook_files``). Kernels
write their stderr to ``kernels.log`` and their progress lines to ``progress.log``; they die with the runner.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from loralab.config import ConfigError
from loralab.files import write_text_atomic
from loralab.lifecycle import RUNNER_ENV
from loralab.run_folder import REPO, RunFolder

NOTEBOOK_DIR = REPO / "notebooks"
TEMPLATES = Path(__file__).with_name("templates")
REPORT_TEMPLATE = "report.html.j2"
"""nbconvert's "lab" page without the scripts it would fetch from a CDN (templates/report.html.j2)."""
ENGINE = "loralab"


def notebook_path(prefix: str) -> Path:
    found = sorted(NOTEBOOK_DIR.glob(f"{prefix}_*.py"))
    if not found:
        raise ConfigError(f"notebook {prefix!r}: no notebooks/{prefix}_*.py")
    return found[0]


def label(prefix: str, tag: str) -> str:
    """How a notebook of the plan is named on the console and in the reports: "03_training bs2"."""
    return f"{notebook_path(prefix).stem}{' ' + tag if tag else ''}"


def declared_parameters(nb) -> set[str]:
    """Names assigned in the notebook's parameters cell (papermill passes only these)."""
    import ast

    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
    return set()


console_stderr: int | None = None
"""The runner's own stderr while kernels' chatter goes to kernels.log (None outside ``kernel_stderr_to``)."""


@contextlib.contextmanager
def kernel_stderr_to(path: Path):
    """Kernels inherit our stderr and chatter on it; send that to a log file instead."""
    global console_stderr

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        console_stderr = saved
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            console_stderr = None
            os.close(saved)


@contextlib.contextmanager
def kernel_env(run: RunFolder):
    """What the kernels inherit: progress as plain lines into progress.log (the runner shows them), and the
    runner's pid, so a kernel dies with the runner (``loralab.lifecycle.arm_from_env``)."""
    env = {"LORALAB_PROGRESS": "lines", "LORALAB_PROGRESS_FILE": str(run.progress_file), RUNNER_ENV: str(os.getpid())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StopBeforeCell(Exception):
    """The run was asked to stop: the notebook's next cell is not started."""


def _register_engine() -> None:
    """papermill's nbclient engine, asking ``should_stop()`` before each cell: a stop request that lands between
    two cells (where the kernel ignores SIGINT) still stops the notebook."""
    from papermill.engines import NBClientEngine, papermill_engines

    class StoppableEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, should_stop=None, **kwargs):
            start = nb_man.cell_start

            def cell_start(cell, *args, **kw):
                if should_stop is not None and should_stop():
                    raise StopBeforeCell("stopped before the next cell (run interrupted)")
                return start(cell, *args, **kw)

            nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE, StoppableEngine)


def disk_full(text: str) -> bool:
    return "No space left on device" in text or "Disk quota exceeded" in text


def no_write_permission(text: str) -> bool:
    return "Permission denied" in text or "Read-only file system" in text


def short_error(exc: BaseException) -> str:
    """One line: the exception's name and the first line of its message (a notebook's error: the cell's)."""
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", None)
    if value is None:
        value = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{name}: {str(value).splitlines()[0] if str(value) else ''}"[:400]


def execute(nb_prefix: str, run: RunFolder, params: dict, tag: str = "", should_stop=None) -> dict:
    """Run one notebook with papermill into a hidden partial file, renamed to ``<name>.ipynb`` when the notebook
    ended (a cell's error included: the notebook shows it), then its ``.html``. When the notebook could not end
    (the kernel died, the disk filled, the run stopped before a cell) the partial file is removed: no notebook
    that stops short without saying why. Returns its record."""
    import jupytext
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    _register_engine()
    src = notebook_path(nb_prefix)
    stem = src.stem + (f"_{tag}" if tag else "")
    out_nb, partial, html_path = run.notebook_files(stem)
    for earlier in (out_nb, html_path):  # a resumed run replaces an earlier attempt
        earlier.unlink(missing_ok=True)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    t0 = time.perf_counter()
    status, error, ended = "ok", None, True
    declared = declared_parameters(nb)
    params = {k: v for k, v in params.items() if k in declared}
    try:
        with kernel_stderr_to(run.kernels_log):
            pm.execute_notebook(nb, str(partial), parameters=params, kernel_name="python3", progress_bar=False,
                                cwd=str(run.path), engine_name=ENGINE, should_stop=should_stop)
    except PapermillExecutionError as exc:  # a failed notebook is a result; the sweep goes on
        status, error = "error", short_error(exc)
    except Exception as exc:  # noqa: BLE001 - the kernel died, the disk filled, the run stopped
        status, error, ended = "error", short_error(exc), False
    try:
        if ended and partial.exists():
            os.replace(partial, out_nb)
    finally:
        partial.unlink(missing_ok=True)
    elapsed = time.perf_counter() - t0
    if out_nb.exists():
        try:
            to_html(out_nb, html_path)
        except Exception as exc:  # noqa: BLE001 - the executed .ipynb is still there; say why no HTML
            status, error = "error", (error + "; " if error else "") + f"HTML export failed: {short_error(exc)}"
    return {"notebook": src.stem, "tag": tag, "label": src.stem + (f" {tag}" if tag else ""), "status": status,
            "error": error, "elapsed_s": round(elapsed, 1), "html": html_path.name if html_path.exists() else None}


def to_html(nb_path: Path, html_path: Path) -> None:
    """The executed notebook as a report: code cells left out (the .ipynb beside it has them); outputs, errors
    included, stay; no script from a CDN."""
    import nbformat
    from jinja2 import FileSystemLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            extra_loaders=[FileSystemLoader(str(TEMPLATES))], template_file=REPORT_TEMPLATE)
    body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
    write_text_atomic(html_path, body)
