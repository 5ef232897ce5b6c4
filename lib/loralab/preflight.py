"""Checks made before a run folder exists: each bad input is a one-line ``ConfigError`` (run_all.py exits 2).

``--out`` is a folder this process can write in (a real probe write: root ignores permission bits, a read-only
mount does not), its disk and the model cache's have room, a model folder's config and weights load, the data
fills one step of the largest batch, the notebooks exist, a scaling reference is a comparable run;
``resume_config`` says whether a run folder can be resumed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loralab.config import ConfigError, RunConfig
from loralab.data import check_trainable, load_splits, tokenize_split
from loralab.lifecycle import still_alive
from loralab.model import cache_bytes_needed, load_problem, load_tokenizer_for
from loralab.notebooks import notebook_path
from loralab.run_folder import RunFolder
from loralab.shape import is_preset, model_config

GIB = 2**30
MIN_FREE_GIB = 1.0
"""Free space a run needs on the disk of --out (executed notebooks, HTML reports, training checkpoints of LoRA
adapters and their optimizer states); a preset or a Meta checkpoint to be written into the model cache needs
its own size there too."""


def validate(cfg: RunConfig) -> None:
    """Every input checked up front: a bad one stops the run before a folder exists."""
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
    per_gpu = 1 if cfg.batch_sizes == "auto" else max(cfg.batch_sizes)
    rows = per_gpu * cfg.world_size * cfg.grad_accum
    batch = f"batch size {per_gpu}" + (f" x {cfg.world_size} GPUs x {cfg.grad_accum} accumulation" if rows > per_gpu else "")
    check_trainable(tokenize_split(load_tokenizer_for(cfg, progress=lambda *a: None), splits["train"], cfg.seq_len,
                                   cfg.packing), rows, cfg.data, batch)


def check_scaling_reference(cfg: RunConfig) -> dict:
    """The reference run's summary; a one-line ConfigError when it cannot serve as one."""
    ref = Path(cfg.scaling_reference).expanduser()
    summary = RunFolder(ref).read_summary()
    if summary is None:
        raise ConfigError(f"--scaling-reference {str(ref)!r}: expected an earlier run folder with a summary.json")
    c = summary.get("config", {})
    mine = {"model": cfg.model, "recipe": cfg.recipe.name, "seq_len": cfg.seq_len}
    theirs = {"model": c.get("model"), "recipe": (c.get("recipe") or {}).get("name"), "seq_len": c.get("seq_len")}
    if mine != theirs:
        raise ConfigError(f"--scaling-reference {str(ref)!r}: it ran {theirs}; expected the same model, recipe and "
                          f"seq_len as this run ({mine})")
    return summary


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(folder: Path) -> str | None:
    """None when a file can really be written in ``folder``; else why not."""
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
    folder = Path(model).expanduser()
    if is_preset(model) or not (folder / "config.json").is_file():
        return
    why = load_problem(folder)
    if why:
        raise ConfigError(f"model {model!r}: {why}; expected a model folder whose config and weights load")


def resume_config(run_dir: str | Path) -> tuple[RunConfig, dict]:
    """(the run's RunConfig with ``resume`` set, its run_status.json) for ``run_all.py --resume RUN_DIR``; a one-line
    ConfigError for a folder that is not a run, a run that is still running, or one that is complete."""
    run = RunFolder(run_dir)
    where = f"--resume {str(run.path)!r}"
    if not run.path.is_dir():
        raise ConfigError(f"{where}: no such folder; expected a run folder written by run_all.py")
    status = run.read_status()
    if status is None:
        raise ConfigError(f"{where}: not a run folder (no readable run_status.json); expected a folder written by "
                          f"run_all.py")
    why = still_alive(status)
    if why:
        raise ConfigError(f"{where}: the run is still running ({why}); stop it first (Ctrl-C or kill "
                          f"{status.get('pid')}) or let it finish")
    if not run.has_config():
        raise ConfigError(f"{where}: the run stopped before its configuration was saved "
                          f"({status.get('error') or status.get('status')}); nothing to resume, start a new run")
    if status.get("status") == "complete":
        raise ConfigError(f"{where}: the run is complete; nothing to resume (index.html has its report)")
    try:
        cfg = run.load_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: run_config.json does not load ({str(e).splitlines()[0][:200]})") from None
    cfg.resume = True
    return cfg, status
