"""The sweep runner behind ``run_all.py``: notebooks in order, with papermill, into one run folder.

Order: 00 setup, 01 data, 02 memory math, then per batch size 03 training and 04 profiling, then
05 summaries, 06 report. The run's ``RunConfig`` is built and checked once (before any folder exists),
saved as ``run_config.json`` and handed to every notebook as its ``config`` parameter. Each executed
notebook is saved as ``.ipynb`` and ``.html`` under ``outputs/<run-id>/``; a failed notebook still gets
its HTML with the error shown and the sweep goes on. ``summary.json`` and ``index.html`` are written
last, atomically; ``run_status.json`` says whether the run is running, complete or failed. A run folder
is never reused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import json
import os
import secrets
import time
from pathlib import Path

from loralab.config import ConfigError, RunConfig

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
    from loralab.model import resolve_tokenizer_path
    from loralab.shape import is_preset, model_config
    from loralab.tokenizer import load_tokenizer

    if cfg.batch_sizes == "auto":
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--batch-sizes auto: needs a CUDA GPU (it confirms the choice with a measured step); on "
                              "CPU give batch sizes, e.g. --batch-sizes 1 4 7 8")
    model_config(cfg.model)  # presets, HF folders and Meta checkpoints: one-line errors for anything else
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)
    elif is_preset(cfg.model) and cfg.model != "tiny":
        raise ConfigError(f"tokenizer: the {cfg.model} preset has no tokenizer; pass --tokenizer with a Llama 2 "
                          f"tokenizer.model (vocab 32000)")
    elif not is_preset(cfg.model) and (Path(cfg.model).expanduser() / "config.json").is_file():
        resolve_tokenizer_path(cfg, Path(cfg.model).expanduser())  # an HF folder must bring its tokenizer
    check_data(cfg, load_splits(cfg.data))
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


def default_run_id(cfg: RunConfig) -> str:
    """time-model-recipe plus a short random suffix: unique even for sweeps started in the same second."""
    from loralab.config import RECIPES

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    registered = RECIPES.get(cfg.recipe.name)
    attn = "" if registered and registered.attn_implementation == cfg.recipe.attn_implementation else f"-{cfg.recipe.attn_implementation}"
    return f"{stamp}-{Path(cfg.model).name}-{cfg.recipe.name}{attn}-{secrets.token_hex(2)}"


def new_run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.out)
    run_dir = out / (cfg.run_id or default_run_id(cfg))
    if run_dir.exists():
        raise ConfigError(f"run folder {str(run_dir)!r} exists; a run never overwrites another (choose another --run-id)")
    out.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir()
    return run_dir


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def declared_parameters(nb) -> set[str]:
    """Names assigned in the notebook's parameters cell (papermill passes only these)."""
    import ast

    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
    return set()


@contextlib.contextmanager
def kernel_stderr_to(path: Path):
    """Kernels inherit our stderr and chatter on it; send that to a log file instead."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def execute(nb_prefix: str, run_dir: Path, params: dict, tag: str = "") -> dict:
    """Run one notebook with papermill; always write .ipynb and .html. Returns its record."""
    import jupytext
    import papermill as pm

    src = notebook_path(nb_prefix)
    stem = src.stem + (f"_{tag}" if tag else "")
    out_nb = run_dir / f"{stem}.ipynb"
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    t0 = time.perf_counter()
    status, error = "ok", None
    declared = declared_parameters(nb)
    params = {k: v for k, v in params.items() if k in declared}
    try:
        with kernel_stderr_to(run_dir / "kernels.log"):
            pm.execute_notebook(nb, str(out_nb), parameters=params, kernel_name="python3",
                                progress_bar=False, cwd=str(run_dir))
    except Exception as exc:  # noqa: BLE001 - a failed notebook is a result; the sweep goes on
        status = "error"
        error = _short_error(exc)
    elapsed = time.perf_counter() - t0
    html_path = run_dir / f"{stem}.html"
    if out_nb.exists():
        try:
            to_html(out_nb, html_path)
        except Exception as exc:  # noqa: BLE001 - the executed .ipynb is still there; say why no HTML
            status, error = "error", (error + "; " if error else "") + f"HTML export failed: {_short_error(exc)}"
    return {"notebook": src.stem, "tag": tag, "status": status, "error": error,
            "elapsed_s": round(elapsed, 1), "html": html_path.name if html_path.exists() else None}


def _short_error(exc: Exception) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
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
    html_path.write_text(body, encoding="utf-8")


def write_index(run_dir: Path, records: list[dict], summary: dict) -> None:
    rows = "\n".join(
        f"<tr><td>{html.escape(r['notebook'])}</td><td>{html.escape(r['tag'])}</td>"
        f"<td class='{r['status']}'>{r['status']}</td><td>{r['elapsed_s']:.1f} s</td>"
        f"<td>{_link(r['html'])}</td>"
        f"<td>{html.escape(r['error'] or '')}</td></tr>" for r in records)
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
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>loralab run {html.escape(summary['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
.ok{{color:#070}}.oom{{color:#b60}}.error{{color:#b00}}.warn{{background:#fff3cd;padding:8px}}</style></head><body>
<h1>loralab run {html.escape(summary['run_id'])}</h1>{banner}
<p>model <b>{html.escape(str(summary['config']['model']))}</b>, recipe <b>{html.escape(summary['config']['recipe']['name'])}</b>,
data <b>{html.escape(str(summary['config']['data']))}</b>, started {html.escape(summary['started'])}, took {summary['elapsed_s']:.0f} s.
Start with the <a href="06_report.html">cross-batch report</a>.</p>
<h2>Sweep</h2><table><tr><th>batch size{' per GPU' if multi else ''}</th><th>status</th><th>peak reserved{' (largest GPU)' if multi else ''}</th><th>throughput{' (all GPUs)' if multi else ''}</th><th>epoch time</th>{gpu_heads}</tr>{sweep}</table>
<h2>Notebooks</h2><table><tr><th>notebook</th><th>part</th><th>status</th><th>time</th><th>HTML</th><th>error</th></tr>{rows}</table>
<p>summary.json holds every number above.</p></body></html>"""
    tmp = run_dir / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, run_dir / "index.html")


def _link(name: str | None) -> str:
    return f'<a href="{html.escape(name)}">report</a>' if name else "–"


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


SWEEP_KEYS = ("status", "steps_per_epoch", "peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib",
              "tokens_per_s", "epoch_time_s", "epoch_time_kind", "final_loss", "error", "predicted_peak_gib",
              "world_size", "strategy", "grad_accum", "global_batch_size", "tokens_per_s_per_gpu", "per_rank")


def collect_summary(run_dir: Path, cfg: RunConfig, records: list[dict], started: str, elapsed: float) -> dict:
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
            row["status"] = "error" if rec else "not run"
            row["error"] = (rec["error"] or "training notebook wrote no result") if rec else None
        for k in ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu"):
            if k in prof:
                row[k] = prof[k]
        sweep.append(row)
    summary = {"run_id": run_dir.name, "started": started, "elapsed_s": round(elapsed, 1),
               "random_weights": cfg.random_weights, "config": cfg.to_dict(),
               "data": {k: data.get(k) for k in ("train_chunks", "val_chunks", "test_chunks", "train_tokens")},
               "sweep": sweep, "notebooks": records, "environment": setup.get("environment")}
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
    import sys

    cfg_file, out_file = run_dir / "results" / "autobatch_config.json", run_dir / "results" / "autobatch.json"
    cfg.at_batch(1).save(cfg_file)
    log("auto batch size: predicting with the memory model, confirming with one measured training step ...", flush=True)
    rc = subprocess.call([sys.executable, "-m", "loralab.autobatch", str(cfg_file), str(out_file)])
    res = _read_json(out_file) or {"error": f"autobatch exited with {rc} and wrote no result"}
    if "error" in res:
        raise ConfigError(res["error"])
    log(f"auto batch size: chose {res['chosen']} (predicted {res['predicted_gib']:.2f} GiB, measured "
        f"{res['measured_gib']:.2f} GiB, headroom {res['headroom_gib']:.2f} GiB of {res['capacity_gib']:.1f} GiB, "
        f"{res['capacity_kind']}); tried {[t['batch_size'] for t in res['tried']]}")
    return [res["chosen"]]


def run_sweep(cfg: RunConfig, log=print) -> Path:
    """Check, make the run folder, run every notebook of the plan, write summary.json and index.html."""
    validate(cfg)
    for n in cfg.defaults_applied:
        log(f"loralab: default: {n}")
    run_dir = new_run_dir(cfg)
    (run_dir / "results").mkdir()
    started = dt.datetime.now().isoformat(timespec="seconds")
    _write_json_atomic(run_dir / "run_status.json", {"status": "running", "started": started})
    t_start = time.perf_counter()
    records: list[dict] = []
    try:
        if cfg.batch_sizes == "auto":
            cfg = RunConfig.from_dict({**cfg.to_dict(), "batch_sizes": resolve_auto_batch(cfg, run_dir, log)})
    except ConfigError as e:  # the folder says it failed; it holds no report that looks complete
        _write_json_atomic(run_dir / "run_status.json", {"status": "failed", "started": started, "error": str(e)})
        raise
    cfg.save(run_dir / "run_config.json")
    plan = build_plan(cfg)
    log(f"loralab: run folder {run_dir}  ({len(plan)} notebooks)")
    base = {"config": cfg.to_dict(), "run_dir": str(run_dir.resolve())}
    status = "interrupted"
    try:
        for i, (nb, tag, extra) in enumerate(plan, 1):
            if nb == "05":
                extra = {**extra, "adapter_dir": best_adapter(run_dir, cfg)}
            label = f"{notebook_path(nb).stem}{' ' + tag if tag else ''}"
            log(f"[{i}/{len(plan)}] {label:<28}", end="", flush=True)
            rec = execute(nb, run_dir, {**base, **extra}, tag)
            records.append(rec)
            from loralab.train import TrainResult

            tr = TrainResult.load(run_dir / tag) if nb == "03" else None
            note = f" (training: {tr.status})" if tr else ""
            log(f" {rec['status']}{note} in {rec['elapsed_s']:.1f} s" + (f"  -- {rec['error']}" if rec["error"] else ""))
        status = "complete"
    finally:
        elapsed = time.perf_counter() - t_start
        summary = collect_summary(run_dir, cfg, records, started, elapsed)
        summary["status"] = status
        _write_json_atomic(run_dir / "summary.json", summary)
        write_index(run_dir, records, summary)
        _write_json_atomic(run_dir / "run_status.json", {"status": status, "started": started,
                                                         "elapsed_s": round(elapsed, 1)})
    log(f"loralab: {status} in {elapsed:.0f} s. Report: {run_dir / 'index.html'}")
    return run_dir
