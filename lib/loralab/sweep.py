"""The sweep behind ``run_all.py``: notebooks in order, with papermill, into one run folder.

Order: 00 setup, 01 data, 02 memory math, then per batch size 03 training and 04 profiling, then
05 summaries, 06 report. The run's ``RunConfig`` is built and checked once (``loralab.preflight``), saved in
the run folder (``loralab.run_folder``) and handed to every notebook as its ``config`` parameter; each notebook
runs in its own kernel (``loralab.notebooks``), so each batch size gets a fresh CUDA context.

While it runs, ``run_status.json`` holds the runner's pid, host and a heartbeat (``loralab.lifecycle``) and each
notebook's record as it ends; kernels' progress lines are shown indented under the notebook's line. At the end
``summary.json``, ``index.html`` (``loralab.index_page``) and ``run_status.json`` are written, each whole or absent.

A failed notebook still gets its HTML with the error shown and the sweep goes on; out of memory is a result; a
failed notebook, a killed kernel or a diverged training makes the run "failed". A full disk, or a run folder that
can no longer be written, stops the sweep; the status file is kept true where the file itself can still be
written, and the advice names the cause. SIGINT / SIGTERM: the running kernel gets SIGINT (a training loop
checkpoints and stops), no notebook starts after it, the reports say "interrupted" and list what did not run.
``resume_sweep`` (``run_all.py --resume``) continues a run that is not running any more in its own folder:
notebooks that completed are kept, the rest run (a training continues from its checkpoint).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loralab import index_page, notebooks
from loralab.config import RECIPES, ConfigError, RunConfig
from loralab.lifecycle import StatusFile, StopOnSignal, descendants, end_tree
from loralab.notebooks import disk_full, execute, no_write_permission, short_error
from loralab.preflight import check_out, check_space, resume_config, validate
from loralab.results import AutoBatchResult, TrainResult
from loralab.run_folder import RunFolder

FOLDER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)
"""The runner's own writes failing for these reasons stop the run with one line (anything else is a bug)."""


def remedy(err: int | None) -> str:
    """What the user can do about a run folder that cannot be written, by the cause."""
    if err in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if err in (errno.EACCES, errno.EPERM):
        return "make the run folder writable again (its permissions changed)"
    if err == errno.EROFS:
        return "remount the run folder's disk read-write"
    if err == errno.ENOENT:
        return "restore the run folder (part of it was removed)"
    return "fix the run folder"


def default_run_id(cfg: RunConfig) -> str:
    """time-model-recipe plus a short random suffix: unique even for sweeps started in the same second."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    registered = RECIPES.get(cfg.recipe.name)
    attn = "" if registered and registered.attn_implementation == cfg.recipe.attn_implementation else f"-{cfg.recipe.attn_implementation}"
    return f"{stamp}-{Path(cfg.model).name}-{cfg.recipe.name}{attn}-{secrets.token_hex(2)}"


def build_plan(cfg: RunConfig) -> list[tuple[str, str, dict]]:
    """(notebook prefix, tag, extra parameters) in run order: 00 01 02, then 03/04 per batch size, 05 06."""
    plan: list[tuple[str, str, dict]] = [(nb, "", {}) for nb in ("00", "01", "02") if nb in cfg.notebooks]
    for bs in cfg.batch_sizes:
        plan += [(nb, RunFolder.batch_tag(bs), {"batch_size": bs}) for nb in ("03", "04") if nb in cfg.notebooks]
    plan += [(nb, "", {}) for nb in ("05", "06") if nb in cfg.notebooks]
    return plan


def resolve_auto_batch(cfg: RunConfig, run: RunFolder, log=print) -> list[int]:
    """--batch-sizes auto, in its own process (its CUDA context must not linger into the notebooks)."""
    cfg.at_batch(1).save(run.autobatch_config_file)
    log("auto batch size: predicting with the memory model, confirming with one measured training step ...", flush=True)
    with open(run.kernels_log, "ab") as errlog:
        rc = subprocess.call([sys.executable, "-m", "loralab.autobatch", str(run.autobatch_config_file),
                              str(run.autobatch_file)], stderr=errlog)
    res = run.autobatch() or AutoBatchResult(error=f"autobatch exited with {rc} and wrote no result (see kernels.log)")
    if res.error:
        raise ConfigError(res.error)
    log(f"auto batch size: {res.line}")
    return [res.chosen]


@dataclass
class Sweep:
    """How a sweep ended: ``status`` "complete", "failed" or "interrupted"; ``failures``: one short text per failed
    notebook; ``stopped_because``: why the sweep stopped early, and ``remedy`` what to do about it; ``signum``: the
    stopping signal; ``report``: index.html, or None when it could not be written."""

    run_dir: Path
    status: str
    planned: int
    failures: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    stopped_because: str = ""
    signum: int | None = None
    remedy: str = ""
    report: Path | None = None

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "failed": 1}.get(self.status, 128 + (self.signum or signal.SIGINT))

    @property
    def message(self) -> str:
        """One line for the user, "" for a complete run."""
        resume = f"python run_all.py --resume {self.run_dir}"
        report = f"report: {self.report}" if self.report else "no report could be written (run_status.json has the state)"
        if self.status == "interrupted":
            return (f"interrupted ({signal.Signals(self.signum or signal.SIGINT).name}) "
                    f"{'in ' + ', '.join(self.interrupted) if self.interrupted else 'between notebooks'}; "
                    f"{len(self.not_run)} of {self.planned} notebooks not run; resume with: {resume}")
        if self.stopped_because:
            return f"{self.stopped_because}; {self.remedy or 'fix the run folder'}, then: {resume}"
        if self.status == "failed":
            return f"{len(self.failures)} of {self.planned} notebooks failed: {', '.join(self.failures)}; {report}"
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


def _failure(rec: dict, tr: TrainResult | None) -> str | None:
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


def run_sweep(cfg: RunConfig, log=print, stop: StopOnSignal | None = None) -> Sweep:
    """Check, make the run folder, run every notebook of the plan, write summary.json and index.html."""
    with contextlib.nullcontext(stop) if stop is not None else StopOnSignal() as stop:
        return _sweep(cfg, log, stop)


def resume_sweep(run_dir: str | Path, log=print, stop: StopOnSignal | None = None) -> Sweep:
    """Continue a run that is not running any more, in its own folder (``preflight.resume_config`` says which)."""
    with contextlib.nullcontext(stop) if stop is not None else StopOnSignal() as stop:
        cfg, previous = resume_config(run_dir)
        return _sweep(cfg, log, stop, RunFolder(run_dir), previous)


def _sweep(cfg: RunConfig, log, stop: StopOnSignal, run: RunFolder | None = None, previous: dict | None = None) -> Sweep:
    where = check_out(run.path if previous else cfg.out, "--resume" if previous else "--out")
    check_space(cfg, where, "--resume" if previous else "--out")
    validate(cfg)
    if previous is None:
        for n in cfg.defaults_applied:
            log(f"loralab: default: {n}")
    started = previous.get("started") if previous else dt.datetime.now().isoformat(timespec="seconds")
    try:
        if previous is None:
            run = RunFolder.create(cfg.out, cfg.run_id or default_run_id(cfg))
        run.remove_stale()
        status = run.status(status="running", started=started, notebooks=(previous or {}).get("notebooks", []),
                            resumed=(previous or {}).get("resumed", []) + ([time.strftime("%Y-%m-%dT%H:%M:%S")]
                                                                           if previous else []))
        status.update()
    except BaseException:
        if previous is None and run is not None and not run.has_status():
            shutil.rmtree(run.path, ignore_errors=True)  # interrupted while making it: leave nothing behind
        raise
    stop.on_stuck = lambda: _abandon(status, stop)
    stop.running()
    status.start_heartbeat()
    try:
        return _run_plan(cfg, log, stop, run, status, previous)
    finally:
        status.stop_heartbeat()
        end_tree(descendants(since=stop.since), grace_s=5)  # nothing the run started outlives it
        stop.finished()


def _run_plan(cfg: RunConfig, log, stop: StopOnSignal, run: RunFolder, status: StatusFile,
              previous: dict | None) -> Sweep:
    t_start = time.perf_counter()
    before_s = float((previous or {}).get("elapsed_s") or 0.0)
    earlier = {r.get("label"): r for r in (previous or {}).get("notebooks", [])}
    records: list[dict] = []
    plan: list = []
    labels: list[str] = []
    stopped_because, cause = "", None

    def known() -> list[dict]:  # this attempt's records, and the earlier attempt's for what it has not reached
        return records + [earlier[l] for l in labels if l in earlier and l not in {r["label"] for r in records}]

    try:
        if cfg.batch_sizes == "auto":
            cfg = RunConfig.from_dict({**cfg.to_dict(), "batch_sizes": resolve_auto_batch(cfg, run, log)})
        if previous is None:
            run.save_config(cfg)
        plan = build_plan(cfg)
        labels = [notebooks.label(nb, tag) for nb, tag, _ in plan]
        log(f"loralab: {'resuming' if previous else 'run folder'} {run.path}  ({len(plan)} notebooks)")
        base = {"config": cfg.to_dict(), "run_dir": str(run.path)}
        console = Console(log)
        reran = False
        with notebooks.kernel_env(run), ProgressTail(run.progress_file, console.progress):
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
                    run.forget_training(extra["batch_size"])  # no earlier attempt's result read as this one's
                if nb == "05":
                    extra = {**extra, "adapter_dir": run.best_adapter(cfg.batch_sizes)}
                console.start(head)
                rec = execute(nb, run, {**base, **extra}, tag, should_stop=lambda: stop.signum is not None)
                tr = run.training(extra["batch_size"]) if nb == "03" else None
                rec["training"] = tr.status if tr else None
                if stop.signum is not None and (rec["status"] == "error" or rec["training"] == "interrupted"):
                    rec["status"] = "interrupted"
                rec["failure"] = _failure(rec, tr)
                records.append(rec)
                note = f" (training: {tr.status})" if tr else ""
                console.end(f"{rec['status']}{note} in {rec['elapsed_s']:.1f} s" + (f"  -- {rec['error']}" if rec["error"] else ""))
                status.update(notebooks=known(), failed=sum(1 for r in records if r.get("failure")))
                if disk_full(rec["error"] or ""):
                    stopped_because = f"no space left on the disk of {run.path}: the run stopped at {label} ({rec['error']})"
                    cause = errno.ENOSPC
                    break
                if rec["status"] == "error" and not run.has(rec["html"]) and no_write_permission(rec["error"] or ""):
                    stopped_because = f"cannot write in the run folder {run.path}: the run stopped at {label} ({rec['error']})"
                    cause = errno.EROFS if "Read-only" in rec["error"] else errno.EACCES
                    break
                if stop.signum is not None:
                    break
    except OSError as e:  # the runner's own writes (a full disk, a folder gone or read-only): said in one line
        if e.errno not in FOLDER_ERRNOS:
            raise
        stopped_because, cause = f"cannot write in the run folder {run.path}: the run stopped ({short_error(e)})", e.errno
    except BaseException as e:  # --batch-sizes auto found nothing that fits, or a bug: the folder says it failed
        if not (isinstance(e, ConfigError) and stop.signum is not None):  # (else: interrupted while choosing)
            with contextlib.suppress(OSError):
                status.update(status="failed", error=short_error(e))
            raise
    elapsed = before_s + time.perf_counter() - t_start
    state = _final_state(plan, labels, records, stop, stopped_because)
    cause = _finish(run, cfg, known(), status, state, elapsed) or cause
    report = run.index_file if run.index_file.exists() else None
    result = Sweep(run.path, state["status"], state["planned"], state["failures"], state["not_run"],
                   state["interrupted"], state.get("stopped_because", ""),
                   stop.signum if state["status"] == "interrupted" else None, remedy(cause) if cause else "", report)
    log(f"loralab: {result.status} in {elapsed:.0f} s. " + (f"Report: {report}" if report else
                                                            f"No report could be written in {run.path}"))
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


def _finish(run: RunFolder, cfg: RunConfig, records: list[dict], status: StatusFile, state: dict,
            elapsed: float) -> int | None:
    """summary.json, index.html, then run_status.json, each whole or absent (a full disk leaves no half-written
    file); one that cannot be written makes the run "failed" and ``state["stopped_because"]`` says why. Returns the
    errno of the first write that failed (None: all written)."""
    cause = None

    def failed(e: OSError) -> None:
        nonlocal cause
        cause = cause or e.errno
        state.setdefault("stopped_because", f"cannot write the reports of {run.path} ({short_error(e)})")
        state["status"] = "failed" if state["status"] == "complete" else state["status"]
        summary.update(state)

    summary = run.collect_summary(cfg, records, status.state["started"], elapsed, state)
    for write in (lambda: run.write_summary(summary),
                  lambda: index_page.write(run, records, summary),
                  lambda: status.update(notebooks=records, elapsed_s=round(elapsed, 1),
                                        **{k: v for k, v in state.items() if k != "plan"})):
        try:
            write()
        except OSError as e:
            failed(e)
    return cause


def _abandon(status: StatusFile, stop: StopOnSignal) -> None:
    """The main thread did not return after every child was killed: say so in the folder and on the console, exit."""
    try:
        status.update(status="interrupted", error="the runner stopped while a notebook would not end; its children "
                                                  "were killed")
    except OSError:
        pass
    line = (f"run_all.py: interrupted ({signal.Signals(stop.signum or signal.SIGINT).name}); resume with: python "
            f"run_all.py --resume {status.path.parent}\n")
    stderr = notebooks.console_stderr
    os.write(stderr if stderr is not None else 2, line.encode())
    os._exit(stop.exit_code)
