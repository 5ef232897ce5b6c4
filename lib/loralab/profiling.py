"""Notebook 04's work: how much arithmetic one LoRA training step does, counted three ways, and how much of the
device it uses.

``run(cfg, run)`` counts the step's FLOPs analytically (``loralab.flops``, the reference), with torch's
``FlopCounterMode`` and with DeepSpeed's profiler on one real step of a random-weight model in the run's shape,
takes the step time (measured in the run's training at this batch size when it ran, else timed here), measures
the matmul peak, derives TFLOP/s, MFU and HFU, samples the device while it works, and saves a ``ProfileResult``.
"""

from __future__ import annotations

import torch

from loralab import flops, profilers, study
from loralab.config import RunConfig
from loralab.device import resolve_device
from loralab.gpu_monitor import GpuMonitor
from loralab.model import build_random_model
from loralab.results import ProfileResult
from loralab.run_folder import RunFolder
from loralab.shape import model_config

BATCH_SIZES_SHOWN = (1, 2, 4, 7, 8)
"""Batch sizes of the FLOPs-per-step table (the study's Figures 10 and 11)."""


def flops_seq_len(cfg: RunConfig, run: RunFolder, batch_size: int) -> tuple[int, str]:
    """The sequence length to count FLOPs at, and why: a run that trained one dialogue per row (not packed) saw
    rows far shorter than seq_len, so its FLOPs are counted at the mean row length it trained on."""
    trained = run.training(batch_size)
    if trained and trained.tokens_per_step and trained.tokens_per_step < 0.95 * batch_size * cfg.seq_len:
        mean_len = max(1, round(trained.tokens_per_step / batch_size))
        return mean_len, (f"rows are single dialogues (not packed): FLOPs at their mean length, {mean_len} tokens, "
                          f"not seq_len {cfg.seq_len}")
    return cfg.seq_len, ""


def measured_step_times(run: RunFolder, batch_size: int) -> list[float]:
    """Step times of the run's training at this batch size, the warm-up step left out (empty: it did not train)."""
    times = [s["step_time_s"] for s in run.steps(batch_size)]
    return times[1:] or times


def per_batch_size(mcfg, recipe, seq_len: int) -> tuple[list[dict], dict]:
    """Analytic FLOPs and MACs per step for ``BATCH_SIZES_SHOWN``, and the line model TFLOPs = a x batch + b."""
    rows = []
    for b in BATCH_SIZES_SHOWN:
        f = flops.recipe_step_flops(mcfg, recipe, b, seq_len)
        rows.append({"batch size": b, "model TFLOPs": f.model_flops / 1e12, "hardware TFLOPs": f.hardware_flops / 1e12,
                     "TMACs": f.macs / 1e12, "DeepSpeed-convention TFLOPs (3 x fwd)": 3 * f.forward / 1e12})
    slope, intercept, r2 = flops.linear_fit_r2([r["batch size"] for r in rows], [r["model TFLOPs"] for r in rows])
    return rows, {"slope": slope, "intercept": intercept, "r2": r2}


def run(cfg: RunConfig, run: RunFolder) -> ProfileResult:
    """Profile one training step at ``cfg.batch_size`` (``cfg.at_batch``) and save the result."""
    rec, bs = cfg.recipe, cfg.batch_size
    mcfg = model_config(cfg.model)
    dev = resolve_device(cfg.device)
    seq_len, seq_note = flops_seq_len(cfg, run, bs)
    a = flops.recipe_step_flops(mcfg, rec, bs, seq_len)
    a_causal = flops.recipe_step_flops(mcfg, rec, bs, seq_len, causal_attention_discount=True)
    net = build_random_model(mcfg, rec, dev)
    batch = profilers.random_batch(mcfg.vocab_size, bs, seq_len, dev)
    counted = profilers.count_step_flops(net, batch, rec)
    ds = profilers.deepspeed_profile(net, batch)
    if not net.training:
        raise RuntimeError("the profiler must leave the model in train mode")
    with GpuMonitor(interval_s=0.2) as monitor:
        step_times = measured_step_times(run, bs)
        if step_times:
            source = f"measured in training ({len(step_times)} steps)"
        else:
            n, w = (3, 1) if dev.type == "cuda" else (1, 0)  # CPU: one step keeps the notebook under a minute
            step_times = profilers.time_steps(net, batch, n_steps=n, warmup=w, recipe=rec)
            source = f"timed here ({n} step(s) after {w} warm-up, AdamW step included)"
    step_time_s = sorted(step_times)[len(step_times) // 2]
    peak_measured = profilers.measure_matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    peak_sheet = flops.device_peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    metrics = flops.sweep_metrics(mcfg, rec, bs, seq_len, step_time_s, peak_sheet or peak_measured)
    rows, fit = per_batch_size(mcfg, rec, seq_len)
    result = ProfileResult(
        model=cfg.model, recipe=rec.name, batch_size=bs, seq_len=seq_len, seq_len_note=seq_note, device=str(dev),
        analytic=a.as_dict(), causal_model_flops=a_causal.model_flops,
        flop_counter={k: v for k, v in counted.items() if k != "by_op"}, flop_counter_by_op=dict(counted["by_op"]),
        deepspeed=ds, quantization=rec.quantization, step_time_s=step_time_s, step_time_source=source,
        peak_measured_tflops=peak_measured, peak_sheet_tflops=peak_sheet, **metrics, gpu_sampled=bool(monitor.gpu),
        monitor=monitor.summary(), monitor_samples=monitor.dataframe().to_dict("records"), per_batch_size=rows,
        linear_fit=fit,
        study_epoch_steps=study.STEPS_PER_EPOCH.get(bs) if seq_len == 2048 else None)
    run.save(result)
    return result
