"""FLOPs per LoRA step on the GPU: analytic vs torch FlopCounterMode vs DeepSpeed, TFLOP/s, MFU.

    python benchmarks/profile_flops.py --out benchmarks/results/          # H200: Llama-2-7B shape, ~4 min
    python benchmarks/profile_flops.py --smoke --out /tmp/flops-smoke      # CPU, tiny model, seconds

Random weights in the Llama-2-7B shape (FLOPs and time do not depend on the values).
Per recipe and batch size (seq 2048): analytic model / hardware FLOPs, FlopCounterMode
over one real step, DeepSpeed get_model_profile (study's convention), measured step
time (AdamW step included), achieved TFLOP/s, MFU and HFU against the data-sheet
bf16 dense peak and against a matmul peak measured here, GPU use from nvitop.
Recipes (names in ``loralab.config.RECIPES``): "fast" (bf16, SDPA, no checkpointing),
"lora-bf16-ckpt" (fast's layers with HF's reentrant checkpointing and HF's loss: the
"fast+ckpt" rows of the earlier results), and "seed" (the study's: int8 base, fp32 rest, eager,
checkpointing). Everything measured is the library's: the model (``model.build_random_model``),
the step (``profilers.count_step_flops`` / ``time_steps``: ``loralab.train``'s step), the peaks
(``device.MemoryMeter``), out-of-memory (``device.is_oom``), versions (``device.versions``).
Writes flops_<gpu>_<date>.json and .md to --out. An out-of-memory batch is recorded
and the sweep goes on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from loralab import flops
from loralab import profilers
from loralab.config import get_recipe
from loralab.device import MemoryMeter, free_memory, gpu_info, is_oom, resolve_device, versions
from loralab.gpu_monitor import GpuMonitor
from loralab.model import build_random_model
from loralab.shape import preset_config

RECIPES = ["fast", "lora-bf16-ckpt", "seed"]
VERSIONS = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "nvitop")


def run_recipe(label, cfg, recipe, batch_sizes, seq_len, steps, device, peak_sheet, peak_measured, ds_bs):
    rows = []
    meter = MemoryMeter(device)
    model = build_random_model(cfg, recipe, device)
    for bs in batch_sizes:
        row = {"recipe": label, "batch_size": bs, "seq_len": seq_len, "tokens": bs * seq_len, "status": "ok"}
        a = flops.recipe_step_flops(cfg, recipe, bs, seq_len)
        ac = flops.recipe_step_flops(cfg, recipe, bs, seq_len, causal_attention_discount=True)
        row.update(analytic_model_flops=a.model_flops, analytic_hardware_flops=a.hardware_flops,
                   analytic_macs=a.macs, analytic_forward_flops=a.forward,
                   analytic_model_flops_causal=ac.model_flops, analytic=a.as_dict())
        if recipe.quantization != "none":  # what FlopCounterMode can see if bitsandbytes' forward kernels are opaque
            row["analytic_hw_minus_quantized_forward"] = a.hardware_flops - a.frozen_fwd * (
                2 if recipe.gradient_checkpointing == "full" else 1)
        ids = profilers.random_batch(cfg.vocab_size, bs, seq_len, device)
        oom = None
        try:
            t0 = time.perf_counter()
            c = profilers.count_step_flops(model, ids, recipe)
            row.update(fcm_flops=c["total"], fcm_forward=c["forward"], fcm_by_op=c["by_op"],
                       fcm_vs_analytic_hw=c["total"] / a.hardware_flops, fcm_s=time.perf_counter() - t0)
            if "analytic_hw_minus_quantized_forward" in row:
                row["fcm_vs_analytic_visible"] = c["total"] / row["analytic_hw_minus_quantized_forward"]
            if bs in ds_bs:
                d = profilers.deepspeed_profile(model, ids)
                row.update(ds_forward_flops=d["forward_flops"], ds_forward_macs=d["forward_macs"], ds_params=d["params"],
                           ds_step_flops=d["step_flops_ds_convention"], ds_error=d["error"])
            meter.reset()
            with GpuMonitor(interval_s=0.2) as mon:
                times = profilers.time_steps(model, ids, n_steps=steps, warmup=1, recipe=recipe)
            st = sorted(times)[len(times) // 2]  # median
            m = flops.sweep_metrics(cfg, recipe, bs, seq_len, st, peak_sheet)
            row.update(step_time_s=st, step_times_s=times, tokens_per_s=bs * seq_len / st, **m,
                       mfu_vs_measured_peak=m["tflops_per_s"] / peak_measured if peak_measured else None,
                       monitor=mon.summary())
            if meter.cuda:
                row["peak_allocated_gib"] = meter.read()["peak_allocated_gib"]
        except Exception as e:  # noqa: BLE001 - only out-of-memory is a result
            if not is_oom(e):
                raise
            oom = str(e).splitlines()[0][:200]
        if oom:
            row.update(status="oom", error=oom)
        print(json.dumps({k: v for k, v in row.items() if k not in ("analytic", "fcm_by_op")}, default=str), flush=True)
        rows.append(row)
        ids = None
        model.zero_grad(set_to_none=True)  # an out-of-memory step leaves its gradients
        free_memory(device)
    del model
    free_memory(device)
    return rows


def fmt(x, scale=1.0, nd=1):
    return "-" if x is None else f"{x / scale:,.{nd}f}"


def markdown(res) -> str:
    U, us = (1e12, "T") if res["unit"] == "TFLOP" else (1e9, "G")
    L = [f"# FLOPs per LoRA step: {res['model']} shape, random weights", "",
         f"- command: `{res['command']}`", f"- date: {res['date']}",
         f"- GPU: {res['gpu']['name']}, driver {res['gpu']['driver']}",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
         f"- peak: data sheet {res['peak_sheet_tflops']} TFLOP/s (bf16 dense), measured {res['matmul_dtype']} matmul "
         f"{fmt(res['peak_measured_tflops'], 1, 3)} TFLOP/s (n={res['matmul_n']}); MFU divides by: {res['mfu_peak_used']}",
         "- FLOPs: analytic *model* FLOPs (frozen: fwd + input grad; LoRA: fwd + both grads; full s x s attention; "
         "LM head input grad); *hardware* adds checkpoint recompute and the fused-attention backward recompute. "
         "FlopCounterMode counts hardware matmul FLOPs as executed; it cannot see bitsandbytes int8 kernels (seed). "
         "DeepSpeed: one forward, step = 3 x forward (full-training convention).",
         "- MFU = analytic model FLOPs / step time / peak; HFU uses hardware FLOPs. GPU util = nvitop mean over the timed steps.",
         "", f"| recipe | bs | analytic model {us}FLOPs | analytic hw {us}FLOPs | FlopCounterMode {us}FLOPs | FCM / hw | "
         f"DeepSpeed fwd {us}FLOPs | DS MACs ({us}) | DS step (3x fwd) {us}FLOPs | step s | TFLOP/s | MFU % | HFU % | "
         "MFU % (measured peak) | GPU util % | status |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append("| " + " | ".join([
            r["recipe"], str(r["batch_size"]), fmt(r["analytic_model_flops"], U, 2), fmt(r["analytic_hardware_flops"], U, 2),
            fmt(r.get("fcm_flops"), U, 2), fmt(r.get("fcm_vs_analytic_hw"), 1, 4), fmt(r.get("ds_forward_flops"), U, 2),
            fmt(r.get("ds_forward_macs"), U, 2), fmt(r.get("ds_step_flops"), U, 2), fmt(r.get("step_time_s"), 1, 3),
            fmt(r.get("tflops_per_s"), 1, 1 if U == 1e12 else 4), fmt((r.get("mfu") or 0) * 100 if r.get("mfu") is not None else None, 1, 1),
            fmt((r.get("hfu") or 0) * 100 if r.get("hfu") is not None else None, 1, 1),
            fmt(r["mfu_vs_measured_peak"] * 100 if r.get("mfu_vs_measured_peak") is not None else None, 1, 1),
            fmt((r.get("monitor") or {}).get("gpu_util_pct_mean"), 1, 0), r["status"]]) + " |")
    q = [r for r in res["rows"] if r.get("fcm_vs_analytic_visible") is not None]
    if q:
        L += ["", "Quantized recipe: FlopCounterMode / (analytic hardware FLOPs minus the frozen int8 forward, and its "
              "recompute): " + ", ".join(f"bs {r['batch_size']}: {r['fcm_vs_analytic_visible']:.4f}" for r in q)
              + " (near 1 on a GPU: bitsandbytes' int8 forward kernels are what the counter cannot see, its dequantized "
              "backward matmul is seen; on CPU bitsandbytes dequantizes and calls torch matmuls, so all is seen and the ratio is > 1)."]
    L += ["", "| recipe | R^2 analytic FLOPs vs bs | R^2 FlopCounterMode vs bs | R^2 step time vs bs |", "|---|---|---|---|"]
    for k, v in res["linearity"].items():
        L.append(f"| {k} | {fmt(v.get('analytic_r2'), 1, 6)} | {fmt(v.get('fcm_r2'), 1, 6)} | {fmt(v.get('time_r2'), 1, 4)} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after 1 warm-up)")
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="names in loralab.config.RECIPES")
    args = ap.parse_args(argv)
    recipes = {name: get_recipe(name) for name in args.recipes}

    if args.smoke:
        cfg, model_name = preset_config("tiny"), "tiny"
        device = resolve_device("cpu")
        bss, seq, n = args.batch_sizes or [1, 2, 4], args.seq_len or 32, 256
        args.steps = min(args.steps, 1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: use --smoke for the CPU check", file=sys.stderr)
            return 2
        cfg, model_name = preset_config("llama2-7b"), "llama2-7b"
        device = resolve_device("cuda")
        bss, seq, n = args.batch_sizes or [1, 2, 4, 8], args.seq_len or 2048, 8192
    gpu = gpu_info()
    peak_sheet = flops.device_peak_tflops(gpu["name"]) if device.type == "cuda" else None
    peak_measured = profilers.measure_matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32, n=n)
    rows = []
    t_all = time.perf_counter()
    for label in args.recipes:
        rows += run_recipe(label, cfg, recipes[label], bss, seq, args.steps, device, peak_sheet or peak_measured,
                           peak_measured, ds_bs=set(bss))
    lin = {}
    for label in args.recipes:
        rr = [r for r in rows if r["recipe"] == label and r["status"] == "ok"]
        x = [r["batch_size"] for r in rr]
        if len(x) >= 2:
            lin[label] = {"analytic_r2": flops.linear_fit_r2(x, [r["analytic_model_flops"] for r in rr])[2],
                          "fcm_r2": flops.linear_fit_r2(x, [r["fcm_flops"] for r in rr])[2],
                          "time_r2": flops.linear_fit_r2(x, [r["step_time_s"] for r in rr])[2]}
    now = dt.datetime.now(dt.timezone.utc)
    res = {"unit": "GFLOP" if args.smoke else "TFLOP", "matmul_dtype": "fp32" if device.type == "cpu" else "bf16",
           "model": model_name, "random_weights": True, "config": cfg.to_dict(), "command": " ".join(["python"] + sys.argv),
           "date": now.isoformat(timespec="seconds"), "gpu": gpu, "versions": versions(VERSIONS),
           "peak_sheet_tflops": peak_sheet, "peak_measured_tflops": peak_measured, "matmul_n": n,
           "mfu_peak_used": "data-sheet bf16 dense" if peak_sheet else "measured matmul (no data-sheet entry)",
           "rows": rows, "linearity": lin, "wall_s": time.perf_counter() - t_all}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("smoke" if args.smoke else gpu["name"].replace("NVIDIA ", "").replace(" ", "-")) + "_" + now.strftime("%Y%m%d-%H%M%S")
    (out / f"flops_{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"flops_{tag}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / f'flops_{tag}.json'} and .md ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
