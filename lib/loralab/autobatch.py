"""How large a batch fits: predicted by the memory model, confirmed by a measured training step.

* ``largest_batch_that_fits``: the memory model alone (notebook 02's table of cards).
* ``find_batch_size``: the largest batch predicted to fit, confirmed by one measured step, stepping
  down on out-of-memory. The benchmarks use it too, with a predictor from measured probes where the
  memory model does not cover a recipe (``linear_predictor``).
* ``choose`` (``--batch-sizes auto``): ``find_batch_size`` on the run's own model and data with the step
  that trains (``loralab.train.training_step``: the recipe's loss, its levers, the same optimizer), so
  the memory it measures is the memory training will use. It runs as its own process
  (``python -m loralab.autobatch CONFIG_JSON OUT_JSON``) so its model and CUDA context are gone
  before the training notebooks measure memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

from loralab.config import ConfigError, Recipe, RunConfig
from loralab.memory import GIB, predict_peak


def largest_batch_that_fits(model_config, recipe: Recipe, seq_len: int, capacity_gib: float, *,
                            allocator_cap: bool = False, max_batch: int = 4096, **kw: Any) -> int:
    """Largest batch size whose predicted peak fits in ``capacity_gib`` (0 if none).

    ``allocator_cap=False``: a real card of that size (the CUDA context counts).
    ``allocator_cap=True``: an allocator cap (``--gpu-memory-gib``), which limits reserved memory only.
    """
    def fits(b: int) -> bool:
        return predict_peak(model_config, recipe, b, seq_len, **kw).need(allocator_cap) <= capacity_gib * GIB

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class FoundBatch(NamedTuple):
    chosen: int
    """Largest batch size that ran (0: none did)."""
    predicted_gib: float | None
    measured_gib: float | None
    headroom_gib: float | None
    """capacity - measured."""
    tried: list


def find_batch_size(predict_fn: Callable[[int], float], try_step_fn: Callable[[int], float | None],
                    capacity_gib: float, start: int | None = None, *, max_batch: int = 4096) -> FoundBatch:
    """Pick the largest batch predicted to fit, confirm it with one measured step, step down on OOM.

    ``predict_fn(b)`` -> predicted peak GiB; ``try_step_fn(b)`` runs one training step and returns the
    measured peak GiB (None on a device without an allocator to read), raising ``torch.OutOfMemoryError``
    when it does not fit (it must give its memory back before raising). ``start``: the first batch to
    try (default: the largest ``b`` with ``predict_fn(b) <= capacity_gib``, at least 1).
    """
    import torch

    if capacity_gib <= 0:
        raise ConfigError(f"capacity_gib={capacity_gib}: expected a number > 0")
    b = start
    if b is None:
        b = 1
        while b < max_batch and predict_fn(b + 1) <= capacity_gib:
            b += 1 if b < 64 else b // 8
        b = min(b, max_batch)
    if b < 1:
        raise ConfigError(f"start={start}: expected an integer >= 1")
    tried = []
    while b >= 1:
        pred = predict_fn(b)
        try:
            measured = try_step_fn(b)
        except torch.OutOfMemoryError:
            tried.append((b, pred, None))
            b -= 1
            continue
        tried.append((b, pred, measured))
        return FoundBatch(b, pred, measured, None if measured is None else capacity_gib - measured, tried)
    return FoundBatch(0, None, None, None, tried)


def linear_predictor(peak_1: float, peak_2: float) -> Callable[[int], float]:
    """Peak GiB at batch b extrapolated from two measured steps at batch 1 and 2 (activations grow linearly)."""
    slope = max(peak_2 - peak_1, 1e-3)
    return lambda b: peak_1 + (b - 1) * slope


def choose(cfg: RunConfig, log=print) -> dict:
    """--batch-sizes auto: the largest batch the memory model says fits, confirmed by the step that trains."""
    import torch

    from loralab import distributed as D
    from loralab.data import batches, load_splits, tokenize_splits
    from loralab.device import MemoryMeter, capacity_gib, free_memory, is_oom
    from loralab.model import load_for_training
    from loralab.shape import model_config
    from loralab.train import optimizer_setup, training_step

    if not torch.cuda.is_available() or cfg.device == "cpu":
        raise ConfigError("--batch-sizes auto: needs a CUDA GPU (it confirms the choice with a measured step); on CPU "
                          "give batch sizes, e.g. --batch-sizes 1 4 7 8")
    ctx = D.single_process_context(cfg)
    model, tok, info = load_for_training(cfg, progress=log, device=ctx.device)
    wrapped = D.wrap_model(model, ctx, cfg.recipe)
    cap, allocator_cap = capacity_gib(cfg.gpu_memory_gib, ctx.device)
    split = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)["train"]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    opt, _ = optimizer_setup(wrapped, cfg)
    mcfg = model_config(info["model_folder"] or cfg.model)
    meter = MemoryMeter(ctx.device)

    def predict(b: int) -> float:
        return predict_peak(mcfg, cfg.recipe, b, cfg.seq_len).need(allocator_cap) / GIB

    def one_step(b: int) -> float:
        if b > len(split.rows):
            raise ConfigError(f"--batch-sizes auto: batch {b} exceeds the {len(split.rows)} training rows")
        meter.reset()
        try:
            training_step(wrapped, [next(batches(split, b, pad))], opt, ctx)
            torch.cuda.synchronize(ctx.device)
            return meter.read()["peak_reserved_gib"]
        except Exception as exc:
            opt.zero_grad(set_to_none=True)
            free_memory(ctx.device)
            if is_oom(exc):
                raise torch.OutOfMemoryError(str(exc)) from exc
            raise
        finally:
            free_memory(ctx.device)

    found = find_batch_size(predict, one_step, cap, max_batch=len(split.rows))
    if found.chosen == 0:
        raise ConfigError(f"--batch-sizes auto: not even batch size 1 fits in {cap:.1f} GiB")
    return {"chosen": found.chosen, "predicted_gib": found.predicted_gib, "measured_gib": found.measured_gib,
            "headroom_gib": found.headroom_gib, "capacity_gib": cap,
            "capacity_kind": "allocator cap (--gpu-memory-gib)" if allocator_cap else "whole card",
            "step": f"loralab.train.training_step with the {cfg.recipe.name} recipe's loss and levers",
            "tried": [{"batch_size": b, "predicted_gib": p, "measured_gib": m, "status": "ok" if m is not None else "oom"}
                      for b, p, m in found.tried]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = RunConfig.load(Path(argv[0]))
    try:
        result = choose(cfg, log=lambda *a, **k: print(*a, file=sys.stderr, flush=True))
    except ConfigError as e:
        Path(argv[1]).write_text(json.dumps({"error": str(e)}))
        return 2
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
