"""Training checkpoints: what a resumed run needs to continue the same loss curve, written atomically.

A checkpoint is a folder ``<out>/checkpoints/step-000123/`` holding
  * the trainable parameters (the LoRA adapter) and the optimizer state, through
    ``torch.distributed.checkpoint`` (``get_state_dict`` / ``dcp.save``): one file per rank, sharded
    under FSDP, a single file for one process; frozen base weights are not saved (they never change);
  * ``trainer.pt``: the scheduler's state and the loop's position (step, epoch, the losses, step times
    and tokens so far, each rank's memory peaks), written by rank 0;
  * ``rng-rank{r}.pt``: each rank's RNG states (torch CPU and CUDA, Python, NumPy), so LoRA dropout
    draws the same masks after a resume;
  * ``complete.json``, written last.
It is written into a hidden ``.step-000123.partial`` folder and renamed when complete, so a kill at any
moment leaves either a whole checkpoint or none; the two newest are kept (as HF Trainer's
``save_total_limit=2``). ``latest`` finds the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from pathlib import Path

import torch

KEEP = 2


def _trainable(model) -> dict:
    """The trainable parameters (the adapter) by name, as tensors sharing the parameters' storage (so a load
    writes into them; DTensor shards under FSDP). The frozen base is not checkpointed: it never changes and is
    loaded from the model folder again. (torch's get_state_dict walks every buffer, and bitsandbytes' int8
    layers report state-dict keys that are not attributes.)"""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _one_process_quiet():
    """One process has no process group; dcp says so on every call ("assuming ... a single process"): it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a training run folder, or None."""
    found = sorted(p for p in folder(out_dir).glob("step-*") if (p / "complete.json").exists())
    return found[-1] if found else None


def save(out_dir: Path, model, optimizer, scheduler, ctx, loop: dict) -> Path:
    """Write a checkpoint of ``model`` (``distributed.wrap_model``'s module), ``optimizer`` and ``scheduler``
    with the loop's position ``loop`` (JSON-able; ``loop["step"]`` names it). Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from loralab import distributed as D

    name = f"step-{loop['step']:06d}"
    final = folder(out_dir) / name
    partial = folder(out_dir) / f".{name}.partial"
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    D.barrier(ctx)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_options())
    with _one_process_quiet():
        dcp.save({"model": _trainable(model), "optim": optim_sd}, checkpoint_id=str(partial), no_dist=not ctx.enabled)
    torch.save(_rng_state(), partial / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "loop": loop}, partial / "trainer.pt")
    D.barrier(ctx)
    if ctx.is_main:
        (partial / "complete.json").write_text(json.dumps({"step": loop["step"], "world_size": ctx.world_size}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        older = sorted(p for p in folder(out_dir).glob("step-*") if p != final)
        for old in older[:len(older) - (KEEP - 1)]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(ctx)
    return final


def load(path: Path, model, optimizer, scheduler, ctx) -> dict:
    """Restore a checkpoint into ``model``, ``optimizer``, ``scheduler`` and this rank's RNGs; returns the loop
    position saved with it. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from loralab.config import ConfigError

    done = json.loads((Path(path) / "complete.json").read_text())
    if done["world_size"] != ctx.world_size:
        raise ConfigError(f"checkpoint {str(path)!r}: written by {done['world_size']} process(es); this run has "
                          f"{ctx.world_size}: resume with the same --nproc and --nnodes")
    state = {"model": _trainable(model), "optim": get_optimizer_state_dict(model, optimizer, options=_options())}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not ctx.enabled)  # the adapter: in place, into the parameters
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optim"], options=_options())
    trainer = torch.load(Path(path) / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(torch.load(Path(path) / f"rng-rank{ctx.rank}.pt", weights_only=False))
    return trainer["loop"]
