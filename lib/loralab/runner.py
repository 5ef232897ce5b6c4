"""The sweep runner behind ``run_all.py``: notebooks in order, with papermill, into one run folder.

Order: 00 setup, 01 data, 02 memory math, then per batch size 03 training and 04 profiling, then
05 summaries, 06 report. The run's ``RunConfig`` is built and checked once, saved as ``run_config.json``
and handed to every notebook as its ``config`` parameter.

Before a run folder exists every input is checked, each a one-line ``ConfigError`` (exit 2): ``--out`` is a
folder this process can write in (a real probe write: root ignores permission bits, a read-only mount does
not), its disk and the model cache's have room, a model folder's config and weights load, the data is usable.

While it runs, each executed notebook goes to a hidden ``.<name>.partial.ipynb`` renamed to ``<name>.ipynb``
when the notebook ends, then ``.html``; ``summary.json``, ``index.html`` and ``run_status.json`` are written
through tmp + rename, so no file that looks like a result is ever half-written. Kernels append progress lines
to ``progress.log`` (``LORALAB_PROGRESS_FILE``), shown indented under the notebook's line. ``run_status.json``
holds the runner's pid, host and a heartbeat (``loralab.lifecycle``) and each notebook's record as it ends.

A failed notebook still gets its HTML with the error shown and the sweep goes on; out of memory is a result; a
failed notebook, a killed kernel or a diverged training makes the run "failed". A full disk stops the sweep.
SIGINT / SIGTERM: the running kernel gets SIGINT (a training loop checkpoints and stops), no notebook starts
after it, the reports say "interrupted" and list what did not run. ``resume_sweep`` (``run_all.py --resume``)
continues a run that is not running any more in its own folder: notebooks that completed are kept, the rest run
(a training continues from its checkpoint).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import html
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loralab.config import ConfigError, RunConfig
from loralab.files import write_json_atomic, write_text_atomic
from loralab.lifecycle import RUNNER_ENV, StatusFile, StopOnSignal, descendants, end_tree, still_alive

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"


def notebook_path(prefix: str) -> Path:
    found = sorted(NOTEBOOK_DIR.glob(f"{prefix}_*.py"))
    if not found:
        raise ConfigError(f"notebook {prefix!r}: no notebooks/{prefix}_*.py")
    return found[0]


def validate(cfg: RunConfig) -> None:
    """Every input checked up front: a bad one stops the run before a folder exists."""
    from loralab.data import load_splits
    from loralab.shape import model_config

    if cfg.batch_sizes == "auto":
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--batch-sizes auto: needs a CUDA GPU (it confirms the choice with a measured step); on "
                              "CPU give batch sizes, e.g. --batch-sizes 1 4 7 8")
    model_config(cfg.model)  # presets, HF folders and Meta checkpoints: one-line errors for anything else
    check_model_folder(cfg.model)
    check_data(cfg, load_splits(cfg.data))  # loads the tokenizer: one-line errors for a missing or bad one
    for nb in cfg.notebooks:
        notebook_path(nb)
    if cfg.scaling_reference:
        check_scaling_reference(cfg)


def check_data(cfg: RunConfig, splits: dict) -> None:
    """The train split fills one step of the largest batch (tokenized here; the notebooks reuse the cache)."""
    from loralab.data import check_trainable, tokenize_split
    from loralab.model import load_tokenizer_for

    per_gpu = 1 if cfg.batch_sizes == "auto" else max(cfg.batch_sizes)
    rows = per_gpu * cfg.world_size * cfg.grad_accum
    batch = f"batch size {per_gpu}" + (f" x {cfg.world_size} GPUs x {cfg.grad_accum} accumulation" if rows > per_gpu else "")
    check_trainable(tokenize_split(load_tokenizer_for(cfg, progress=lambda *a: None), splits["train"], cfg.seq_len,
                                   cfg.packing), rows, cfg.data, batch)


def check_scaling_reference(cfg: RunConfig) -> dict:
    """The reference run's summary.json; a one-line ConfigError when it cannot serve as one."""
    ref = Path(cfg.scaling_reference).expanduser()
    summary = _read_json(ref / "summary.json")
    if summary is None:
        raise ConfigError(f"--scaling-reference {str(ref)!r}: expected an earlier run folder with a summary.json")
    c = summary.get("config", {})
    mine = {"model": cfg.model, "recipe": cfg.recipe.name, "seq_len": cfg.seq_len}
    theirs = {"model": c.get("model"), "recipe": (c.get("recipe") or {}).get("name"), "seq_len": c.get("seq_len")}
    if mine != theirs:
        raise ConfigError(f"--scaling-reference {str(ref)!r}: it ran {theirs}; expected the same model, recipe and "
                          f"seq_len as this run ({mine})")
    return summary


GIB = 2**30
MIN_FREE_GIB = 1.0
"""Free space a run needs on the disk of --out (executed notebooks, HTML reports, training checkpoints of LoRA
adapters and their optimizer states); a preset or a Meta checkpoint to be written into the model cache needs
its own size there too."""


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(folder: Path) -> str | None:
    """None when a file can really be written in ``folder``; else why not."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".loralab-probe-", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None if os.access(folder, os.W_OK | os.X_OK) else "no write permission"


def check_out(out: str | Path, what: str = "--out") -> Path:
    """The folder a run folder will be made in (or its nearest existing ancestor), after checking that it is a
    folder (or can become one) and that this process can write there."""
    given = Path(out).expanduser().absolute()
    if given.exists() and not given.is_dir():
        raise ConfigError(f"{what} {str(out)!r}: is a file; expected a folder to write run folders into")
    where = _existing(given)
    if not where.is_dir():
        raise ConfigError(f"{what} {str(out)!r}: {str(where)!r} is a file, so no folder can be made under it; "
                          f"expected a folder to write run folders into")
    why = _probe_write(where)
    if why:
        raise ConfigError(f"{what} {str(out)!r}: cannot write in {str(where)!r} ({why}); expected a folder this "
                          f"user can write to")
    return where


def check_space(cfg: RunConfig, where: Path, what: str = "--out") -> None:
    """Room for the outputs on ``where``'s disk, and for the model cache when a model must be written there first."""
    from loralab.model import cache_bytes_needed

    free = shutil.disk_usage(where).free
    if free < MIN_FREE_GIB * GIB:
        raise ConfigError(f"{what} {str(where)!r}: {free / GIB:.2f} GiB free on its disk; a run needs at least "
                          f"{MIN_FREE_GIB:g} GiB (notebooks, reports, training checkpoints)")
    needed = cache_bytes_needed(cfg.model)
    if needed:
        cache, size = needed
        free = shutil.disk_usage(_existing(cache)).free
        if free < size * 1.1:
            raise ConfigError(f"model cache {str(cache)!r}: {free / GIB:.2f} GiB free on its disk; writing model "
                              f"{cfg.model!r} there needs {size * 1.1 / GIB:.1f} GiB (free space, or set LORALAB_HOME "
                              f"to a disk with room)")


def check_model_folder(model: str) -> None:
    """A Hugging Face folder whose config or weights do not load (a copy cut short, a truncated download) is
    refused before the run, naming the file."""
    from loralab.model import load_problem
    from loralab.shape import is_preset

    folder = Path(model).expanduser()
    if is_preset(model) or not (folder / "config.json").is_file():
        return
    why = load_problem(folder)
    if why:
        raise ConfigError(f"model {model!r}: {why}; expected a model folder whose config and weights load")


def default_run_id(cfg: RunConfig) -> str:
    """time-model-recipe plus a short random suffix: unique even for sweeps started in the same second."""
    from loralab.config import RECIPES

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    registered = RECIPES.get(cfg.recipe.name)
    attn = "" if registered and registered.attn_implementation == cfg.recipe.attn_implementation else f"-{cfg.recipe.attn_implementation}"
    return f"{stamp}-{Path(cfg.model).name}-{cfg.recipe.name}{attn}-{secrets.token_hex(2)}"


def new_run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.out).expanduser().absolute()
    run_dir = out / (cfg.run_id or default_run_id(cfg))
    if run_dir.exists():
        raise ConfigError(f"run folder {str(run_dir)!r} exists; a run never overwrites another (choose another --run-id)")
    out.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir()
    return run_dir


def declared_parameters(nb) -> set[str]:
    """Names assigned in the notebook's parameters cell (papermill passes only these)."""
    import ast

    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
    return set()


_console_stderr: int | None = None  # the runner's own stderr while kernels' chatter goes to kernels.log


@contextlib.contextmanager
def kernel_stderr_to(path: Path):
    """Kernels inherit our stderr and chatter on it; send that to a log file instead."""
    global _console_stderr

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        _console_stderr = saved
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            _console_stderr = None
            os.close(saved)


@contextlib.contextmanager
def kernel_env(run_dir: Path):
    """What the kernels inherit: progress as plain lines into progress.log (the runner shows them), and the
    runner's pid, so a kernel dies with the runner (``loralab.lifecycle.arm_from_env``)."""
    env = {"LORALAB_PROGRESS": "lines", "LORALAB_PROGRESS_FILE": str(run_dir / "progress.log"),
           RUNNER_ENV: str(os.getpid())}
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


ENGINE = "loralab"


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


def execute(nb_prefix: str, run_dir: Path, params: dict, tag: str = "", should_stop=None) -> dict:
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
    out_nb, partial, html_path = run_dir / f"{stem}.ipynb", run_dir / f".{stem}.partial.ipynb", run_dir / f"{stem}.html"
    for earlier in (out_nb, html_path):  # a resumed run replaces an earlier attempt
        earlier.unlink(missing_ok=True)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    t0 = time.perf_counter()
    status, error, ended = "ok", None, True
    declared = declared_parameters(nb)
    params = {k: v for k, v in params.items() if k in declared}
    try:
        with kernel_stderr_to(run_dir / "kernels.log"):
            pm.execute_notebook(nb, str(partial), parameters=params, kernel_name="python3", progress_bar=False,
                                cwd=str(run_dir), engine_name=ENGINE, should_stop=should_stop)
    except PapermillExecutionError as exc:  # a failed notebook is a result; the sweep goes on
        status, error = "error", _short_error(exc)
    except Exception as exc:  # noqa: BLE001 - the kernel died, the disk filled, the run stopped
        status, error, ended = "error", _short_error(exc), False
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
            status, error = "error", (error + "; " if error else "") + f"HTML export failed: {_short_error(exc)}"
    return {"notebook": src.stem, "tag": tag, "label": src.stem + (f" {tag}" if tag else ""), "status": status,
            "error": error, "elapsed_s": round(elapsed, 1), "html": html_path.name if html_path.exists() else None}


def _short_error(exc: BaseException) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", None)
    if value is None:
        value = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{name}: {str(value).splitlines()[0] if str(value) else ''}"[:400]


OFFLINE_REPORT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
"""nbconvert's "lab" page without the scripts it fetches from a CDN (require.js, MathJax, Mermaid, the widget
manager): the reports use none of them (plotly.js is inlined by report.setup_plotly), and they are read offline."""


def to_html(nb_path: Path, html_path: Path) -> None:
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    # A report, not a listing: code cells are left out of the HTML (the .ipynb beside it has them);
    # outputs, errors included, stay.
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            extra_loaders=[DictLoader({"loralab_report.html.j2": OFFLINE_REPORT_TEMPLATE})],
                            template_file="loralab_report.html.j2")
    body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
    write_text_atomic(html_path, body)


def _state_banner(run_dir: Path, summary: dict) -> str:
    """The run's state, first thing on the page: complete, failed (how many, which) or interrupted (what did not run)."""
    n, failed, not_run = summary.get("planned", 0), summary.get("failures") or [], summary.get("not_run") or []
    esc = html.escape
    if summary["status"] == "complete":
        return f"<p class='done'><b>Complete</b>: all {n} notebooks ran.</p>"
    parts = []
    if summary["status"] == "interrupted":
        stopped = ", ".join(summary.get("interrupted") or []) or "none (between notebooks)"
        parts.append(f"<b>Interrupted</b> ({esc(summary.get('signal') or 'signal')}) in {esc(stopped)}; "
                     f"{len(not_run)} of {n} notebooks not run: {esc(', '.join(not_run)) or 'none'}. Resume with "
                     f"<code>python run_all.py --resume {esc(str(run_dir))}</code>.")
    else:
        parts.append(f"<b>Failed</b>: {len(failed)} of {n} notebooks failed.")
    if failed:
        parts.append(f"Failed: {esc('; '.join(failed))}.")
    if summary.get("stopped_because"):
        parts.append(f"Stopped early: {esc(summary['stopped_because'])}.")
    return f"<p class='stop'>{' '.join(parts)}</p>"


def write_index(run_dir: Path, records: list[dict], summary: dict) -> None:
    """index.html: the run's state at the top, the sweep, then every planned notebook (one that never ran has no
    link; a link only to a file that exists)."""
    by_label = {r["label"]: r for r in records}
    rows = []
    for label in summary.get("plan") or [r["label"] for r in records]:
        r = by_label.get(label)
        if r is None:
            rows.append(f"<tr><td>{html.escape(label)}</td><td></td><td class='notrun'>not run</td><td>–</td>"
                        f"<td>–</td><td></td></tr>")
            continue
        shown = r["status"] if not r.get("failure") or r["status"] != "ok" else "failed"
        rows.append(f"<tr><td>{html.escape(r['notebook'])}</td><td>{html.escape(r['tag'])}</td>"
                    f"<td class='{shown}'>{shown}</td><td>{r['elapsed_s']:.1f} s</td>"
                    f"<td>{_link(run_dir, r['html'])}</td>"
                    f"<td>{html.escape(r.get('failure') or r['error'] or '')}</td></tr>")
    rows = "\n".join(rows)
    multi = any((s.get("world_size") or 1) > 1 for s in summary.get("sweep", []))

    def gpu_cells(s: dict) -> str:  # several GPUs: the global batch, per-GPU throughput and each GPU's peak
        if not multi:
            return ""
        per = ", ".join(_fmt(r.get("peak_reserved_gib"), ".2f") for r in s.get("per_rank") or []) or "–"
        return (f"<td>{s['batch_size']} x {s.get('world_size') or 1} x {s.get('grad_accum') or 1} = "
                f"{_fmt(s.get('global_batch_size'), 'd')}</td><td>{_fmt(s.get('tokens_per_s_per_gpu'), ',.0f')} tok/s</td>"
                f"<td>{per}</td>")

    sweep = "\n".join(
        f"<tr><td>{s['batch_size']}</td><td class='{s['status']}'>{s['status']}</td>"
        f"<td>{'n/a (no GPU)' if s.get('peak_reserved_gib') is None else format(s['peak_reserved_gib'], '.2f') + ' GiB'}</td><td>{_fmt(s.get('tokens_per_s'), ',.0f')} tok/s</td>"
        f"<td>{_fmt(s.get('epoch_time_s'), ',.0f')} s ({html.escape(str(s.get('epoch_time_kind') or '–'))})</td>{gpu_cells(s)}</tr>"
        for s in summary.get("sweep", []))
    gpu_heads = ("<th>batch per GPU x GPUs x accumulation = global</th><th>throughput per GPU</th>"
                 "<th>peak reserved per GPU (GiB)</th>") if multi else ""
    model = str(summary["config"]["model"])
    if model == "tiny":
        banner = ("<p class='warn'><b>Built-in tiny model</b>: a 2-layer Llama built locally so the sweep runs on a "
                  "CPU in minutes. It shows how loralab works, not what a 7B model costs.</p>")
    elif summary.get("random_weights"):
        banner = ("<p class='warn'><b>Random weights</b> (the model's shape only): memory, time and FLOPs are real; "
                  "loss values and summaries mean nothing.</p>")
    else:
        banner = ""
    start = (" Start with the <a href=\"06_report.html\">cross-batch report</a>."
             if (run_dir / "06_report.html").exists() else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>loralab run {html.escape(summary['run_id'])} ({summary['status']})</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
.ok,.done{{color:#070}}.oom{{color:#b60}}.error,.failed,.diverged{{color:#b00}}.interrupted,.notrun{{color:#666}}.warn{{background:#fff3cd;padding:8px}}.stop{{background:#f8d7da;padding:8px}}</style></head><body>
<h1>loralab run {html.escape(summary['run_id'])}: {summary['status']}</h1>{_state_banner(run_dir, summary)}{banner}
<p>model <b>{html.escape(str(summary['config']['model']))}</b>, recipe <b>{html.escape(summary['config']['recipe']['name'])}</b>,
data <b>{html.escape(str(summary['config']['data']))}</b>, started {html.escape(summary['started'])}, took {summary['elapsed_s']:.0f} s.{start}</p>
<h2>Sweep</h2><table><tr><th>batch size{' per GPU' if multi else ''}</th><th>status</th><th>peak reserved{' (largest GPU)' if multi else ''}</th><th>throughput{' (all GPUs)' if multi else ''}</th><th>epoch time</th>{gpu_heads}</tr>{sweep}</table>
<h2>Notebooks</h2><table><tr><th>notebook</th><th>part</th><th>status</th><th>time</th><th>HTML</th><th>error</th></tr>{rows}</table>
<p>summary.json holds every number above.</p></body></html>"""
    write_text_atomic(run_dir / "index.html", page)


def _link(run_dir: Path, name: str | None) -> str:
    return f'<a href="{html.escape(name)}">report</a>' if name and (run_dir / name).exists() else "–"


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


SWEEP_KEYS = ("status", "steps_per_epoch", "peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib",
              "tokens_per_s", "epoch_time_s", "epoch_time_kind", "final_loss", "error", "predicted_peak_gib",
              "world_size", "strategy", "grad_accum", "global_batch_size", "tokens_per_s_per_gpu", "per_rank")


def collect_summary(run_dir: Path, cfg: RunConfig, records: list[dict], started: str, elapsed: float,
                    state: dict | None = None) -> dict:
    """summary.json: the config, the data, a row per batch size, every notebook's record; ``state``: the run's
    status, failures and what did not run."""
    from loralab.train import TrainResult

    data = _read_json(run_dir / "results" / "data.json") or {}
    setup = _read_json(run_dir / "results" / "setup.json") or {}
    sweep = []
    for bs in cfg.batch_sizes if cfg.batch_sizes != "auto" else []:
        tr = TrainResult.load(run_dir / f"bs{bs}")
        prof = _read_json(run_dir / f"bs{bs}" / "profile.json") or {}
        rec = next((r for r in records if r["notebook"].startswith("03") and r["tag"] == f"bs{bs}"), None)
        row = {"batch_size": bs, **dict.fromkeys(SWEEP_KEYS)}
        if tr:
            d = tr.to_dict()
            row.update({k: d[k] for k in SWEEP_KEYS})
        else:
            row["status"] = ("interrupted" if rec["status"] == "interrupted" else "error") if rec else "not run"
            row["error"] = (rec["error"] or "training notebook wrote no result") if rec else None
        for k in ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu"):
            if k in prof:
                row[k] = prof[k]
        sweep.append(row)
    summary = {"run_id": run_dir.name, "started": started, "elapsed_s": round(elapsed, 1),
               "random_weights": cfg.random_weights, "config": cfg.to_dict(),
               "data": {k: data.get(k) for k in ("train_chunks", "val_chunks", "test_chunks", "train_tokens")},
               "sweep": sweep, "notebooks": records, "environment": setup.get("environment"), **(state or {})}
    for key, name in (("auto_batch", "autobatch"), ("eval", "eval"), ("scaling", "scaling")):
        found = _read_json(run_dir / "results" / f"{name}.json")
        if found:
            summary[key] = found
    return summary


def build_plan(cfg: RunConfig) -> list[tuple[str, str, dict]]:
    """(notebook prefix, tag, extra parameters) in run order: 00 01 02, then 03/04 per batch size, 05 06."""
    plan: list[tuple[str, str, dict]] = [(nb, "", {}) for nb in ("00", "01", "02") if nb in cfg.notebooks]
    for bs in cfg.batch_sizes:
        plan += [(nb, f"bs{bs}", {"batch_size": bs}) for nb in ("03", "04") if nb in cfg.notebooks]
    plan += [(nb, "", {}) for nb in ("05", "06") if nb in cfg.notebooks]
    return plan


def best_adapter(run_dir: Path, cfg: RunConfig) -> str:
    """The adapter that saw the most training rows (steps x batch size); "" if none trained."""
    from loralab.train import TrainResult

    best, best_rows = "", -1
    for bs in cfg.batch_sizes:
        tr = TrainResult.load(run_dir / f"bs{bs}")
        if tr and tr.status == "ok" and tr.adapter_dir and tr.steps_done * bs > best_rows:
            best, best_rows = tr.adapter_dir, tr.steps_done * bs
    return best


def resolve_auto_batch(cfg: RunConfig, run_dir: Path, log=print) -> list[int]:
    """--batch-sizes auto, in its own process (its CUDA context must not linger into the notebooks)."""
    import subprocess

    cfg_file, out_file = run_dir / "results" / "autobatch_config.json", run_dir / "results" / "autobatch.json"
    cfg.at_batch(1).save(cfg_file)
    log("auto batch size: predicting with the memory model, confirming with one measured training step ...", flush=True)
    with open(run_dir / "kernels.log", "ab") as errlog:
        rc = subprocess.call([sys.executable, "-m", "loralab.autobatch", str(cfg_file), str(out_file)], stderr=errlog)
    res = _read_json(out_file) or {"error": f"autobatch exited with {rc} and wrote no result (see kernels.log)"}
    if "error" in res:
        raise ConfigError(res["error"])
    log(f"auto batch size: chose {res['chosen']} (predicted {res['predicted_gib']:.2f} GiB, measured "
        f"{res['measured_gib']:.2f} GiB, headroom {res['headroom_gib']:.2f} GiB of {res['capacity_gib']:.1f} GiB, "
        f"{res['capacity_kind']}); tried {[t['batch_size'] for t in res['tried']]}")
    return [res["chosen"]]


# --- the sweep -----------------------------------------------------------------------------------
@dataclass
class Sweep:
    """How a sweep ended: ``status`` "complete", "failed" or "interrupted"; ``failures``: one short text per failed
    notebook; ``stopped_because``: why the sweep stopped early (a full disk); ``signum``: the stopping signal."""

    run_dir: Path
    status: str
    planned: int
    failures: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    stopped_because: str = ""
    signum: int | None = None

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "failed": 1}.get(self.status, 128 + (self.signum or signal.SIGINT))

    @property
    def message(self) -> str:
        """One line for the user, "" for a complete run."""
        report = self.run_dir / "index.html"
        resume = f"python run_all.py --resume {self.run_dir}"
        if self.status == "interrupted":
            return (f"interrupted ({signal.Signals(self.signum or signal.SIGINT).name}) "
                    f"{'in ' + ', '.join(self.interrupted) if self.interrupted else 'between notebooks'}; "
                    f"{len(self.not_run)} of {self.planned} notebooks not run; resume with: {resume}")
        if self.stopped_because:
            return f"{self.stopped_because}; free space, then: {resume}"
        if self.status == "failed":
            return f"{len(self.failures)} of {self.planned} notebooks failed: {', '.join(self.failures)}; report: {report}"
        return ""


class Console:
    """The runner's stdout: a notebook's line, the progress lines of its kernel indented under it, its result."""

    def __init__(self, log=print):
        self.log, self.lock = log, threading.Lock()
        self.head: str | None = None
        self.broken = False

    def start(self, head: str) -> None:
        with self.lock:
            self.log(head, end="", flush=True)
            self.head, self.broken = head, False

    def progress(self, line: str) -> None:
        with self.lock:
            if self.head is not None and not self.broken:
                self.log("", flush=True)
                self.broken = True
            self.log(f"      {line}", flush=True)

    def end(self, text: str) -> None:
        with self.lock:
            self.log(f"{self.head} {text}" if self.broken else f" {text}", flush=True)
            self.head = None


class ProgressTail:
    """Shows the lines kernels append to ``progress.log`` (complete lines only, from where the file ended at start)
    while the sweep runs: a daemon thread polls it every ``interval_s``."""

    def __init__(self, path: Path, emit, interval_s: float = 0.5):
        self.path, self.emit, self.interval_s = path, emit, interval_s
        self.pos = path.stat().st_size if path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loralab-progress-tail", daemon=True)

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        self.pos += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            line = line.replace("\r", "").rstrip()
            if line:
                self.emit(line)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()


def _label(nb: str, tag: str) -> str:
    return f"{notebook_path(nb).stem}{' ' + tag if tag else ''}"


def _failure(rec: dict, tr) -> str | None:
    """Why a notebook that ran counts as failed (None: it did not). Out of memory is a result, not a failure."""
    if rec["status"] == "error":
        return f"error: {rec['error'] or 'unknown'}"[:200]
    if tr is not None and tr.status == "diverged":
        return f"diverged at step {tr.steps_done + 1}"
    if tr is not None and tr.status == "error":
        return f"training error: {tr.error or 'unknown'}"[:200]
    return None


def _ok(rec: dict | None) -> bool:
    return rec is not None and rec["status"] == "ok" and not rec.get("failure")


def resume_config(run_dir: str | Path) -> tuple[RunConfig, dict]:
    """(the run's RunConfig with ``resume`` set, its run_status.json) for ``run_all.py --resume RUN_DIR``; a one-line
    ConfigError for a folder that is not a run, a run that is still running, or one that is complete."""
    run_dir = Path(run_dir).expanduser().absolute()
    where = f"--resume {str(run_dir)!r}"
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: no such folder; expected a run folder written by run_all.py")
    try:
        status = _read_json(run_dir / "run_status.json")
    except ValueError:
        status = None
    if status is None or not isinstance(status, dict):
        raise ConfigError(f"{where}: not a run folder (no readable run_status.json); expected a folder written by "
                          f"run_all.py")
    why = still_alive(status)
    if why:
        raise ConfigError(f"{where}: the run is still running ({why}); stop it first (Ctrl-C or kill "
                          f"{status.get('pid')}) or let it finish")
    if not (run_dir / "run_config.json").is_file():
        raise ConfigError(f"{where}: the run stopped before its configuration was saved "
                          f"({status.get('error') or status.get('status')}); nothing to resume, start a new run")
    if status.get("status") == "complete":
        raise ConfigError(f"{where}: the run is complete; nothing to resume (index.html has its report)")
    try:
        cfg = RunConfig.load(run_dir / "run_config.json")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: run_config.json does not load ({str(e).splitlines()[0][:200]})") from None
    cfg.resume = True
    return cfg, status


def run_sweep(cfg: RunConfig, log=print, stop: StopOnSignal | None = None) -> Sweep:
    """Check, make the run folder, run every notebook of the plan, write summary.json and index.html."""
    with contextlib.nullcontext(stop) if stop is not None else StopOnSignal() as stop:
        return _sweep(cfg, log, stop)


def resume_sweep(run_dir: str | Path, log=print, stop: StopOnSignal | None = None) -> Sweep:
    """Continue a run that is not running any more, in its own folder (``resume_config`` says which)."""
    with contextlib.nullcontext(stop) if stop is not None else StopOnSignal() as stop:
        cfg, previous = resume_config(run_dir)
        return _sweep(cfg, log, stop, Path(run_dir).expanduser().absolute(), previous)


def _sweep(cfg: RunConfig, log, stop: StopOnSignal, run_dir: Path | None = None, previous: dict | None = None) -> Sweep:
    where = check_out(run_dir if previous else cfg.out, "--resume" if previous else "--out")
    check_space(cfg, where, "--resume" if previous else "--out")
    validate(cfg)
    if previous is None:
        for n in cfg.defaults_applied:
            log(f"loralab: default: {n}")
    started = previous.get("started") if previous else dt.datetime.now().isoformat(timespec="seconds")
    try:
        if previous is None:
            run_dir = new_run_dir(cfg)
            (run_dir / "results").mkdir()
        for stale in [*run_dir.glob(".*.partial.ipynb"), *run_dir.glob("*.tmp")]:  # what a killed run left
            stale.unlink(missing_ok=True)
        status = StatusFile(run_dir / "run_status.json", status="running", started=started,
                            notebooks=(previous or {}).get("notebooks", []),
                            resumed=(previous or {}).get("resumed", []) + ([time.strftime("%Y-%m-%dT%H:%M:%S")]
                                                                           if previous else []))
        status.update()
    except BaseException:
        if previous is None and run_dir is not None and not (run_dir / "run_status.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # interrupted while making it: leave nothing behind
        raise
    stop.on_stuck = lambda: _abandon(status, stop)
    stop.running()
    status.start_heartbeat()
    try:
        return _run_plan(cfg, log, stop, run_dir, status, previous)
    finally:
        status.stop_heartbeat()
        end_tree(descendants(since=stop.since), grace_s=5)  # nothing the run started outlives it
        stop.finished()


def _run_plan(cfg: RunConfig, log, stop: StopOnSignal, run_dir: Path, status: StatusFile,
              previous: dict | None) -> Sweep:
    from loralab.train import RESULT_FILE, TrainResult

    t_start = time.perf_counter()
    before_s = float((previous or {}).get("elapsed_s") or 0.0)
    earlier = {r.get("label"): r for r in (previous or {}).get("notebooks", [])}
    records: list[dict] = []
    plan: list = []
    labels: list[str] = []
    stopped_because = ""

    def known() -> list[dict]:  # this attempt's records, and the earlier attempt's for what it has not reached
        return records + [earlier[l] for l in labels if l in earlier and l not in {r["label"] for r in records}]

    try:
        if cfg.batch_sizes == "auto":
            cfg = RunConfig.from_dict({**cfg.to_dict(), "batch_sizes": resolve_auto_batch(cfg, run_dir, log)})
        if previous is None:
            write_json_atomic(run_dir / "run_config.json", cfg.to_dict())
        plan = build_plan(cfg)
        labels = [_label(nb, tag) for nb, tag, _ in plan]
        log(f"loralab: {'resuming' if previous else 'run folder'} {run_dir}  ({len(plan)} notebooks)")
        base = {"config": cfg.to_dict(), "run_dir": str(run_dir)}
        console = Console(log)
        reran = False
        with kernel_env(run_dir), ProgressTail(run_dir / "progress.log", console.progress):
            for i, ((nb, tag, extra), label) in enumerate(zip(plan, labels), 1):
                head = f"[{i}/{len(plan)}] {label:<28}"
                if _ok(earlier.get(label)) and not (reran and nb in ("05", "06")):  # 05, 06 summarise what re-ran
                    records.append(earlier[label])
                    log(f"{head} ok (kept from the earlier attempt)")
                    continue
                if stop.signum is not None:
                    break
                reran = True
                if nb == "03":
                    (run_dir / tag / RESULT_FILE).unlink(missing_ok=True)  # no earlier attempt's result read as this one's
                if nb == "05":
                    extra = {**extra, "adapter_dir": best_adapter(run_dir, cfg)}
                console.start(head)
                rec = execute(nb, run_dir, {**base, **extra}, tag, should_stop=lambda: stop.signum is not None)
                tr = TrainResult.load(run_dir / tag) if nb == "03" else None
                rec["training"] = tr.status if tr else None
                if stop.signum is not None and (rec["status"] == "error" or rec["training"] == "interrupted"):
                    rec["status"] = "interrupted"
                rec["failure"] = _failure(rec, tr)
                records.append(rec)
                status.update(notebooks=known(), failed=sum(1 for r in records if r.get("failure")))
                note = f" (training: {tr.status})" if tr else ""
                console.end(f"{rec['status']}{note} in {rec['elapsed_s']:.1f} s" + (f"  -- {rec['error']}" if rec["error"] else ""))
                if disk_full(rec["error"] or ""):
                    stopped_because = f"no space left on the disk of {run_dir}: the run stopped at {label} ({rec['error']})"
                    break
                if stop.signum is not None:
                    break
    except OSError as e:  # the runner's own writes (a full disk, a folder gone): the run failed, said in one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT):
            raise
        stopped_because = f"cannot write in the run folder {run_dir}: the run stopped ({_short_error(e)})"
    except BaseException as e:  # --batch-sizes auto found nothing that fits, or a bug: the folder says it failed
        if not (isinstance(e, ConfigError) and stop.signum is not None):  # (else: interrupted while choosing)
            with contextlib.suppress(OSError):
                status.update(status="failed", error=_short_error(e))
            raise
    elapsed = before_s + time.perf_counter() - t_start
    state = _final_state(plan, labels, records, stop, stopped_because)
    _finish(run_dir, cfg, known(), status, state, elapsed)
    result = Sweep(run_dir, state["status"], state["planned"], state["failures"], state["not_run"],
                   state["interrupted"], state.get("stopped_because", ""),
                   stop.signum if state["status"] == "interrupted" else None)
    log(f"loralab: {result.status} in {elapsed:.0f} s. Report: {run_dir / 'index.html'}")
    return result


def _final_state(plan: list, labels: list[str], records: list[dict], stop: StopOnSignal, stopped_because: str) -> dict:
    done = {r["label"] for r in records}
    not_run = [l for l in labels if l not in done]
    failures = [f"{r['label']} ({r['failure']})" for r in records if r.get("failure")]
    stopped = [r["label"] for r in records if r["status"] == "interrupted"]
    interrupted = stop.signum is not None and bool(not plan or not_run or stopped)
    st = "interrupted" if interrupted else ("failed" if failures or stopped_because else "complete")
    out = {"status": st, "planned": len(plan), "failures": failures, "failed": len(failures), "not_run": not_run,
           "interrupted": stopped, "plan": labels}
    if interrupted:
        out["signal"] = signal.Signals(stop.signum).name
    if stopped_because:
        out["stopped_because"] = stopped_because
    return out


def _finish(run_dir: Path, cfg: RunConfig, records: list[dict], status: StatusFile, state: dict, elapsed: float) -> None:
    """summary.json, index.html, then run_status.json, each whole or absent (a full disk leaves no half-written
    file); one that cannot be written makes the run "failed" and ``state["stopped_because"]`` says why."""
    def failed(e: OSError) -> None:
        state.setdefault("stopped_because", f"cannot write the reports of {run_dir} ({_short_error(e)})")
        state["status"] = "failed" if state["status"] == "complete" else state["status"]
        summary.update(state)

    summary = collect_summary(run_dir, cfg, records, status.state["started"], elapsed, state)
    for write in (lambda: write_json_atomic(run_dir / "summary.json", summary),
                  lambda: write_index(run_dir, records, summary),
                  lambda: status.update(notebooks=records, elapsed_s=round(elapsed, 1),
                                        **{k: v for k, v in state.items() if k != "plan"})):
        try:
            write()
        except OSError as e:
            failed(e)


def _abandon(status: StatusFile, stop: StopOnSignal) -> None:
    """The main thread did not return after every child was killed: say so in the folder and on the console, exit."""
    try:
        status.update(status="interrupted", error="the runner stopped while a notebook would not end; its children "
                                                  "were killed")
    except OSError:
        pass
    line = (f"run_all.py: interrupted ({signal.Signals(stop.signum or signal.SIGINT).name}); resume with: python "
            f"run_all.py --resume {status.path.parent}\n")
    os.write(_console_stderr if _console_stderr is not None else 2, line.encode())
    os._exit(stop.exit_code)
