"""The run folder: the one owner of its layout. No other code spells a path inside it.

    <run>/run_config.json     the run's RunConfig, saved once before any notebook runs
    <run>/run_status.json     running / complete / failed / interrupted, pid, host, heartbeat, each notebook's record
    <run>/summary.json        every number of the run (``collect_summary``), written at the end
    <run>/index.html          the page that links the reports
    <run>/<notebook>.ipynb    each executed notebook, and its .html (``.<notebook>.partial.ipynb`` while it runs)
    <run>/progress.log        the kernels' progress lines; kernels.log: their stderr
    <run>/results/            the run-wide typed results: setup.json, data.json, eval.json, autobatch.json, scaling.json
    <run>/bs<N>/              one batch size: train_result.json, profile.json, steps.jsonl, monitor.csv, adapter/,
                              checkpoints/ (``loralab.train`` writes what it trains into it)

A notebook run alone in JupyterLab gets a new folder of the same layout under ``outputs/notebooks/``
($LORALAB_OUTPUTS/notebooks/ when set): ``RunFolder.for_notebook``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from loralab.config import ConfigError, RunConfig
from loralab.files import write_json_atomic, write_text_atomic
from loralab.lifecycle import StatusFile
from loralab.results import (
    AutoBatchResult,
    DataResult,
    EvaluationResult,
    ProfileResult,
    Result,
    ScalingResult,
    SetupResult,
    TrainResult,
)

REPO = Path(__file__).resolve().parents[2]
PER_BATCH_SIZE = (TrainResult, ProfileResult)
"""Results of one batch size: saved in ``bs<N>/``; every other result in ``results/``."""
SWEEP_KEYS = ("status", "steps_per_epoch", "peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib",
              "tokens_per_s", "epoch_time_s", "epoch_time_kind", "final_loss", "error", "predicted_peak_gib",
              "world_size", "strategy", "grad_accum", "global_batch_size", "tokens_per_s_per_gpu", "per_rank")
"""The TrainResult fields of each row of ``summary.json["sweep"]``."""
PROFILE_KEYS = ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu")


def outputs_root() -> Path:
    """Where run folders go by default: $LORALAB_OUTPUTS, else the repository's outputs/."""
    return Path(os.environ.get("LORALAB_OUTPUTS", REPO / "outputs"))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


class RunFolder:
    """One run's folder: where each file of the run lies, and reading and writing its typed results."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # --- making and finding one ---------------------------------------------------------------------
    @classmethod
    def create(cls, out: str | Path, run_id: str) -> "RunFolder":
        """A new, empty run folder ``out/run_id``; a ConfigError when it exists (a run never overwrites another)."""
        out = Path(out).expanduser().absolute()
        path = out / run_id
        if path.exists():
            raise ConfigError(f"run folder {str(path)!r} exists; a run never overwrites another (choose another --run-id)")
        out.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        run = cls(path)
        run.results_dir.mkdir()
        return run

    @classmethod
    def for_notebook(cls, run_dir: str, notebook: str) -> "RunFolder":
        """run_all.py's run folder (``run_dir``), else a new folder the notebook names under outputs/notebooks/."""
        if run_dir:
            return cls(run_dir)
        path = outputs_root() / "notebooks" / f"{notebook}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path.mkdir(parents=True, exist_ok=True)
        print(f"outputs of this notebook: {path}")
        return cls(path)

    @classmethod
    def latest(cls, out: str | Path | None = None) -> "RunFolder | None":
        """The newest run folder run_all.py wrote under ``out`` (default: ``outputs_root()``), or None."""
        runs = sorted(Path(out or outputs_root()).glob(f"*/{cls.CONFIG}"), key=lambda p: p.stat().st_mtime)
        return cls(runs[-1].parent) if runs else None

    # --- the layout ---------------------------------------------------------------------------------
    CONFIG = "run_config.json"
    STATUS = "run_status.json"
    SUMMARY = "summary.json"
    INDEX = "index.html"

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def status_file(self) -> Path:
        return self.path / self.STATUS

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def index_file(self) -> Path:
        return self.path / self.INDEX

    @property
    def results_dir(self) -> Path:
        return self.path / "results"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.log"

    @property
    def kernels_log(self) -> Path:
        return self.path / "kernels.log"

    @property
    def autobatch_config_file(self) -> Path:
        return self.results_dir / "autobatch_config.json"

    @property
    def autobatch_file(self) -> Path:
        return self.results_dir / AutoBatchResult.FILE

    def batch_dir(self, batch_size: int) -> Path:
        """What one batch size's training and profiling write (``loralab.train`` trains into it)."""
        return self.path / f"bs{batch_size}"

    @staticmethod
    def batch_tag(batch_size: int) -> str:
        """The tag of a batch size's notebooks: ``03_training_<tag>.html``."""
        return f"bs{batch_size}"

    def notebook_files(self, stem: str) -> tuple[Path, Path, Path]:
        """(executed notebook, its hidden partial file while it runs, its HTML report)."""
        return self.path / f"{stem}.ipynb", self.path / f".{stem}.partial.ipynb", self.path / f"{stem}.html"

    def has(self, name: str | None) -> bool:
        """A file of that name exists in the folder (a report to link)."""
        return bool(name) and (self.path / name).exists()

    def remove_stale(self) -> None:
        """What a killed run left: partial notebooks and tmp files."""
        for stale in [*self.path.glob(".*.partial.ipynb"), *self.path.glob("*.tmp")]:
            stale.unlink(missing_ok=True)

    # --- the run's configuration, status and summary ------------------------------------------------
    def save_config(self, cfg: RunConfig) -> None:
        write_json_atomic(self.config_file, cfg.to_dict())

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def load_config(self) -> RunConfig:
        return RunConfig.load(self.config_file)

    def read_status(self) -> dict | None:
        """run_status.json, or None where it is absent or unreadable."""
        try:
            status = _read_json(self.status_file)
        except (ValueError, OSError):
            return None
        return status if isinstance(status, dict) else None

    def status(self, **fields) -> StatusFile:
        """The status file of a run this process runs (``StatusFile``)."""
        return StatusFile(self.status_file, **fields)

    def has_status(self) -> bool:
        return self.status_file.exists()

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_file, summary)

    def read_summary(self) -> dict | None:
        try:
            return _read_json(self.summary_file)
        except ValueError:
            return None

    def write_index(self, page: str) -> None:
        write_text_atomic(self.index_file, page)

    # --- typed results ------------------------------------------------------------------------------
    def _folder_of(self, kind: type[Result], batch_size: int | None) -> Path:
        if kind in PER_BATCH_SIZE:
            if batch_size is None:
                raise ValueError(f"{kind.__name__}: a result of one batch size; give batch_size")
            return self.batch_dir(batch_size)
        return self.results_dir

    def save(self, result: Result) -> Path:
        """Write ``result`` where its kind belongs (a batch size's results in its ``bs<N>/``)."""
        bs = getattr(result, "batch_size", None) if type(result) in PER_BATCH_SIZE else None
        return result.save(self._folder_of(type(result), bs))

    def load(self, kind: type[Result], batch_size: int | None = None):
        """The saved result of that kind (of that batch size), or None."""
        return kind.load(self._folder_of(kind, batch_size))

    def setup(self) -> SetupResult | None:
        return self.load(SetupResult)

    def data(self) -> DataResult | None:
        return self.load(DataResult)

    def evaluation(self) -> EvaluationResult | None:
        return self.load(EvaluationResult)

    def autobatch(self) -> AutoBatchResult | None:
        return self.load(AutoBatchResult)

    def scaling(self) -> ScalingResult | None:
        return self.load(ScalingResult)

    def training(self, batch_size: int) -> TrainResult | None:
        return self.load(TrainResult, batch_size)

    def profile(self, batch_size: int) -> ProfileResult | None:
        return self.load(ProfileResult, batch_size)

    def forget_training(self, batch_size: int) -> None:
        """Remove a batch size's training result, so no earlier attempt's is read as the next one's."""
        (self.batch_dir(batch_size) / TrainResult.FILE).unlink(missing_ok=True)

    def steps(self, batch_size: int) -> list[dict]:
        """The step log of a batch size's training (one dict per step; empty when no step completed)."""
        f = self.batch_dir(batch_size) / "steps.jsonl"
        if not f.exists():
            return []
        return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]

    def monitor_samples(self, batch_size: int) -> list[dict]:
        """The device monitor's samples during a batch size's training (``monitor.csv``), as rows."""
        import csv

        f = self.batch_dir(batch_size) / "monitor.csv"
        if not f.exists():
            return []
        with open(f, newline="") as fh:
            return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                    for row in csv.DictReader(fh)]

    # --- across batch sizes -------------------------------------------------------------------------
    def best_adapter(self, batch_sizes) -> str:
        """The adapter that saw the most training rows (steps x batch size); "" if none trained."""
        best, best_rows = "", -1
        for bs in batch_sizes:
            tr = self.training(bs)
            if tr and tr.status == "ok" and tr.adapter_dir and tr.steps_done * bs > best_rows:
                best, best_rows = tr.adapter_dir, tr.steps_done * bs
        return best

    def sweep_rows(self, batch_sizes, records: list[dict] | None = None) -> list[dict]:
        """``summary.json["sweep"]``: per batch size its training result's numbers and its profile's FLOPs; a batch
        size without a result says why (interrupted, its notebook's error, or not run)."""
        rows = []
        for bs in batch_sizes:
            tr, prof = self.training(bs), self.profile(bs)
            rec = next((r for r in records or [] if r["notebook"].startswith("03") and r["tag"] == self.batch_tag(bs)),
                       None)
            row = {"batch_size": bs, **dict.fromkeys(SWEEP_KEYS)}
            if tr:
                d = tr.to_dict()
                row.update({k: d[k] for k in SWEEP_KEYS})
            else:
                row["status"] = ("interrupted" if rec["status"] == "interrupted" else "error") if rec else "not run"
                row["error"] = (rec["error"] or "training notebook wrote no result") if rec else None
            if prof:
                row.update({k: getattr(prof, k) for k in PROFILE_KEYS})
            rows.append(row)
        return rows

    def collect_summary(self, cfg: RunConfig, records: list[dict], started: str, elapsed: float,
                        state: dict | None = None) -> dict:
        """summary.json: the config, the data, a row per batch size, every notebook's record; ``state``: the run's
        status, failures and what did not run."""
        data, setup = self.data(), self.setup()
        summary = {"run_id": self.name, "started": started, "elapsed_s": round(elapsed, 1),
                   "random_weights": cfg.random_weights, "config": cfg.to_dict(),
                   "data": {k: getattr(data, k) if data else None
                            for k in ("train_chunks", "val_chunks", "test_chunks", "train_tokens")},
                   "sweep": self.sweep_rows(cfg.batch_sizes if cfg.batch_sizes != "auto" else [], records),
                   "notebooks": records, "environment": setup.environment if setup else None, **(state or {})}
        for key, found in (("auto_batch", self.autobatch()), ("eval", self.evaluation()), ("scaling", self.scaling())):
            if found:
                summary[key] = found.to_dict()
        return summary

    def scaling_against(self, reference: str | Path, batch_sizes) -> ScalingResult:
        """This run's tokens/s per batch size against the reference run's (``--scaling-reference``): speed-up and
        efficiency = speed-up / (GPUs here / GPUs there); batch sizes trained in both runs only."""
        ref = RunFolder(reference).read_summary() or {}
        ref_rows = {r["batch_size"]: r for r in ref.get("sweep", []) if r.get("status") == "ok" and r.get("tokens_per_s")}
        rows = []
        for bs in batch_sizes:
            mine = self.training(bs)
            if not (mine and mine.status == "ok" and mine.tokens_per_s and bs in ref_rows):
                continue
            w_ref, w = ref_rows[bs].get("world_size", 1), mine.world_size
            speedup = mine.tokens_per_s / ref_rows[bs]["tokens_per_s"]
            rows.append({"batch size per GPU": bs, "GPUs (reference)": w_ref, "GPUs (this run)": w,
                         "tokens/s (reference)": ref_rows[bs]["tokens_per_s"], "tokens/s (this run)": mine.tokens_per_s,
                         "speed-up": speedup, "efficiency": speedup / (w / w_ref)})
        return ScalingResult(reference=str(reference), rows=rows)

    def report(self, cfg: RunConfig) -> "SweepReport":
        """Notebook 06's result: every batch size's training and profile, the run's set-up and auto-batch choice,
        the step logs, and the scaling comparison (computed and saved when the run has a reference)."""
        batch_sizes = list(cfg.batch_sizes) if cfg.batch_sizes != "auto" else []
        scaling = None
        if cfg.scaling_reference:
            scaling = self.scaling_against(cfg.scaling_reference, batch_sizes)
            self.save(scaling)
        return SweepReport(run=self, batch_sizes=batch_sizes,
                           training={bs: self.training(bs) for bs in batch_sizes},
                           profiles={bs: self.profile(bs) for bs in batch_sizes},
                           steps={bs: self.steps(bs) for bs in batch_sizes},
                           setup=self.setup(), autobatch=self.autobatch(), scaling=scaling)


@dataclass
class SweepReport:
    """What notebook 06 shows: the run's results across batch sizes, read through its ``RunFolder``."""

    run: RunFolder | None
    batch_sizes: list[int] = field(default_factory=list)
    training: dict[int, TrainResult | None] = field(default_factory=dict)
    profiles: dict[int, ProfileResult | None] = field(default_factory=dict)
    steps: dict[int, list[dict]] = field(default_factory=dict)
    setup: SetupResult | None = None
    autobatch: AutoBatchResult | None = None
    scaling: ScalingResult | None = None

    def value(self, batch_size: int, key: str):
        tr = self.training.get(batch_size)
        return None if tr is None else getattr(tr, key)

    def status(self, batch_size: int) -> str:
        tr = self.training.get(batch_size)
        return "– (its training notebook failed or did not run)" if tr is None else tr.status

    @property
    def environment(self) -> dict:
        return self.setup.environment if self.setup else {}
