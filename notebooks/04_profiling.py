# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Profiling: FLOPs, MACs, TFLOP/s, MFU and GPU use
#
# How much arithmetic one LoRA training step does, counted three ways, and how much of the
# GPU it uses. The study profiled with DeepSpeed's FLOPs profiler and nvitop (its Figures 10
# and 11: TFLOPs and MACs per step grow linearly with the batch size). loralab shows the same,
# and what those tools get wrong for LoRA:
#
# * **analytic** (`loralab.flops`, the reference): frozen weights cost forward + input
#   gradient and no weight gradient; the adapters cost forward and both gradients; attention
#   over the full s x s matrix; the LM head (frozen); recompute from checkpointing counted
#   apart (*model* FLOPs vs *hardware* FLOPs);
# * **torch `FlopCounterMode`** over one real step: counts the matmuls as they execute;
# * **DeepSpeed `get_model_profile`**, as the study: one forward, and "step = 3 x forward",
#   a full fine-tuning convention that overcounts LoRA. Neither tool sees bitsandbytes' int8 kernels.
#
# The model here has **random weights** in the chosen shape: FLOPs and time do not depend on
# the weights' values.

# %% tags=["parameters"]
model = "tiny"  # preset, Hugging Face folder or Meta checkpoint folder (its shape, random weights)
recipe = ""  # empty = the default for the model: demo for the tiny model, seed otherwise
batch_size = 1  # sequences per step
seq_len = 2048  # tokens per sequence
device = "auto"  # auto, cpu or cuda
run_dir = ""  # a run folder whose bs<N>/steps.jsonl gives measured step times; empty = time a few steps here
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import Markdown, display
from plotly.subplots import make_subplots

from loralab import flops as F
from loralab import profilers as P
from loralab import study
from loralab.device import resolve_device
from loralab.gpu_monitor import GpuMonitor
from loralab.model import build_random_model
from loralab.report import banner, notebook_config, notebook_run_dir, setup_plotly, write_json
from loralab.shape import ModelShape, model_config
from loralab.train import TrainResult

setup_plotly()
cfg = notebook_config(config, model=model, recipe=recipe, batch_sizes=[batch_size], seq_len=seq_len,
                      device=device).at_batch(batch_size)
out = notebook_run_dir(run_dir, "04_profiling")
banner(cfg)
rec = cfg.recipe
seq_len = cfg.seq_len
mcfg = model_config(cfg.model)
dev = resolve_device(cfg.device)
shape = ModelShape.of(mcfg)
print(f"model {cfg.model}: {shape.L} layers, hidden {shape.H}, vocab {shape.V}, "
      f"{shape.total_params() / 1e9:.3f} B parameters (random weights here: FLOPs and time do not depend on them)")
print(f"recipe {rec.name}: quantization {rec.quantization}, params {rec.param_dtype}, autocast {rec.autocast}, "
      f"checkpointing {rec.gradient_checkpointing}, attention {rec.attn_implementation}, LoRA r{rec.lora_r} on "
      f"{', '.join(rec.lora_targets)}")
# A run that trained one dialogue per row (not packed) saw rows far shorter than seq_len:
# count its FLOPs at the mean row length it actually trained on (notebook 03's result).
trained = TrainResult.load(out / f"bs{batch_size}")
if trained and trained.tokens_per_step and trained.tokens_per_step < 0.95 * batch_size * seq_len:
    mean_len = max(1, round(trained.tokens_per_step / batch_size))
    print(f"rows are single dialogues (not packed): FLOPs at their mean length, {mean_len} tokens, not seq_len {seq_len}")
    seq_len = mean_len
print(f"batch size {batch_size} x seq {seq_len} = {batch_size * seq_len:,} tokens per step, device {dev}")

# %% [markdown]
# ## The analytic count
#
# One matmul (m x k) @ (k x n) is 2·m·k·n FLOPs, m·k·n MACs. Per frozen linear of W (in x out)
# and T tokens: forward 2·T·in·out, backward only the input gradient 2·T·in·out (4 FLOPs per
# weight and token instead of full training's 6). Per adapter A (r x in), B (out x r): forward,
# weight gradients and input gradients, 6·T·r·(in+out). Attention: Q·Kᵀ and P·V,
# 2·b·h·s²·d_head each, backward twice that. Elementwise work (RMSNorm, SiLU, softmax, RoPE,
# loss) is not counted: about 0.1 % at 7B, and no profiler below counts it as matmul either.

# %%
a = F.recipe_step_flops(mcfg, rec, batch_size, seq_len)
a_causal = F.recipe_step_flops(mcfg, rec, batch_size, seq_len, causal_attention_discount=True)
parts = [("frozen weights: forward", a.frozen_fwd), ("frozen weights: input grad", a.frozen_bwd),
         ("LoRA: forward", a.lora_fwd), ("LoRA: weight + input grads", a.lora_bwd),
         ("attention: forward", a.attn_fwd), ("attention: backward", a.attn_bwd),
         ("LM head: forward", a.head_fwd), ("LM head: input grad", a.head_bwd),
         ("= model FLOPs", a.model_flops),
         ("checkpoint recompute (1 forward per layer)", a.checkpoint_recompute),
         ("fused-attention backward recompute", a.attn_kernel_recompute),
         ("= hardware FLOPs", a.hardware_flops)]
table = pd.DataFrame(parts, columns=["part", "FLOPs"])
table["GFLOP"] = table["FLOPs"] / 1e9
table["% of model FLOPs"] = 100 * table["FLOPs"] / a.model_flops
display(table.style.format({"FLOPs": "{:,.0f}", "GFLOP": "{:,.3f}", "% of model FLOPs": "{:.1f}"}).hide(axis="index"))
print(f"MACs per step: {a.macs / 1e9:,.3f} GMAC (= model FLOPs / 2)")
print(f"attention counted causally (FlashAttention's convention) would give {a_causal.model_flops / 1e9:,.3f} GFLOP "
      f"model FLOPs ({100 * (1 - a_causal.model_flops / a.model_flops):.1f} % less); loralab uses the full matrix "
      f"(PaLM, Megatron, and both profilers)")

# %% [markdown]
# ## Two profilers on one real step
#
# `FlopCounterMode` counts each matmul-like aten op as it executes: with checkpointing it
# sees the recompute, with fused attention it sees the kernel's backward recompute, so it
# matches the analytic **hardware** count. DeepSpeed counts one forward (matmuls plus some
# elementwise ops) and reports a training step as 3 x forward.

# %%
net = build_random_model(mcfg, rec, dev)
batch = P.random_batch(mcfg.vocab_size, batch_size, seq_len, dev)
counted = P.count_step_flops(net, batch, rec)
ds = P.deepspeed_profile(net, batch)
assert net.training, "the profiler must leave the model in train mode"
by_op = pd.Series(counted["by_op"], name="FLOPs").sort_values(ascending=False).rename_axis("aten op").reset_index()
display(by_op.style.format({"FLOPs": "{:,.0f}"}).hide(axis="index"))
cmp = pd.DataFrame([
    ("analytic: model FLOPs", a.model_flops, "what the step needs"),
    ("analytic: hardware FLOPs", a.hardware_flops, "+ recompute"),
    ("torch FlopCounterMode", counted["total"], counted["convention"]),
    ("DeepSpeed: forward", ds["forward_flops"], "one forward, incl. some elementwise ops"),
    ("DeepSpeed: step = 3 x forward", ds["step_flops_ds_convention"], ds["convention"]),
], columns=["source", "FLOPs per step", "convention"])
cmp["GFLOP per step"] = cmp["FLOPs per step"].astype(float) / 1e9
cmp["vs analytic hardware (x)"] = cmp["FLOPs per step"].astype(float) / a.hardware_flops
display(cmp[["source", "GFLOP per step", "vs analytic hardware (x)", "convention"]].style.format(
    {"GFLOP per step": "{:,.3f}", "vs analytic hardware (x)": "{:.3f}"}, na_rep="– (not run)").hide(axis="index"))
if ds["available"]:
    print(f"DeepSpeed: {ds['forward_macs'] / 1e9:,.3f} GMAC forward, {ds['params']:,} parameters")
else:
    print(f"DeepSpeed profiler not run: {ds['error']}")
if rec.quantization != "none":
    display(Markdown(
        f"**{rec.quantization} caveat.** The frozen weights are bitsandbytes {rec.quantization} modules. On a GPU their "
        "forward runs in bitsandbytes' own kernels, which neither `FlopCounterMode` nor DeepSpeed's patched "
        "`F.linear` can see, so both undercount: the analytic row is the one to trust. (On CPU bitsandbytes "
        "dequantizes and calls torch matmuls, which are counted.)"))

# %% [markdown]
# ## Achieved TFLOP/s and MFU
#
# MFU (model FLOPs utilisation, PaLM App. B) = analytic model FLOPs / step time / peak;
# HFU adds the recompute. The peak is the GPU's dense bf16 tensor-core peak (A100 312,
# H100 SXM and H200 989 TFLOP/s): the ceiling of the hardware for this work, whatever
# dtype the recipe chose. A matmul measured here gives the peak reachable in practice.

# %%
steps_file = out / f"bs{batch_size}" / "steps.jsonl"
if not (steps_file.exists() and steps_file.stat().st_size):
    steps_file = None
with GpuMonitor(interval_s=0.2) as monitor:
    if steps_file is not None:
        st = pd.read_json(steps_file, lines=True)
        step_times = st["step_time_s"].iloc[1:].tolist() or st["step_time_s"].tolist()  # skip the warm-up step
        source = f"measured in training ({steps_file}, {len(step_times)} steps)"
    else:
        n, w = (3, 1) if dev.type == "cuda" else (1, 0)  # CPU: one step keeps the notebook under a minute
        step_times = P.time_steps(net, batch, n_steps=n, warmup=w, recipe=rec)
        source = f"timed here ({n} step(s) after {w} warm-up, AdamW step included)"
step_time_s = sorted(step_times)[len(step_times) // 2]
peak_measured = P.measure_matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
peak_sheet = F.device_peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
peak = peak_sheet or peak_measured
m = F.sweep_metrics(mcfg, rec, batch_size, seq_len, step_time_s, peak)
print(f"step time {step_time_s:.3f} s (median; {source}); {batch_size * seq_len / step_time_s:,.0f} tok/s")
print(f"achieved {m['tflops_per_s']:.3f} TFLOP/s (model FLOPs), {m['hardware_flops_per_step'] / step_time_s / 1e12:.3f} TFLOP/s (hardware)")
print(f"peak: data sheet {peak_sheet if peak_sheet else '-'} TFLOP/s bf16 dense; measured matmul "
      f"{peak_measured:.3f} TFLOP/s ({'bf16' if dev.type == 'cuda' else 'fp32, CPU'})")
print(f"MFU {100 * m['mfu']:.2f} %, HFU {100 * m['hfu']:.2f} % (vs {peak:.3g} TFLOP/s); "
      f"MFU vs measured matmul peak {100 * m['tflops_per_s'] / peak_measured:.2f} %")
if seq_len == 2048 and batch_size in study.STEPS_PER_EPOCH:
    steps_epoch = study.STEPS_PER_EPOCH[batch_size]
    print(f"epoch time on SAMSum packed at 2048 ({steps_epoch} steps at bs {batch_size}): "
          f"{steps_epoch * step_time_s:,.0f} s = {steps_epoch * step_time_s / 3600:.2f} h"
          + (f" (study on an A100: {study.EPOCH_TIME_S[batch_size]:,.0f} s)" if batch_size in study.EPOCH_TIME_S else ""))

# %% [markdown]
# ## GPU use over time
#
# nvitop samples the device in the background: utilisation, memory used (whole device) and
# power. Without an NVIDIA driver (CI, a laptop) only the host is sampled.

# %%
mon = monitor.dataframe()
if monitor.gpu:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True,
                        subplot_titles=("GPU utilisation (%)", "device memory used (GiB)", "power (W)"))
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.gpu_util_pct, name="util %"), row=1, col=1)
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.mem_used_gib, name="GiB"), row=2, col=1)
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.power_w, name="W"), row=3, col=1)
else:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True,
                        subplot_titles=("host CPU (%, no NVML here)", "host memory used (GiB)"))
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.host_cpu_pct, name="CPU %"), row=1, col=1)
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.host_mem_gib, name="GiB"), row=2, col=1)
fig.update_xaxes(title_text="time (s)")
fig.update_layout(height=600, showlegend=False, title=f"{rec.name}, batch size {batch_size}")
fig.show()
summ = monitor.summary()
print(f"{summ['samples']} samples; mean GPU utilisation {summ['gpu_util_pct_mean']:.0f} %, "
      f"peak device memory {summ['mem_used_gib_max']:.2f} GiB, mean power {summ['power_w_mean']:.0f} W")

# %% [markdown]
# ## Why ~100 % utilisation is not efficiency
#
# NVML's "GPU utilisation" is the fraction of time in which *at least one kernel* was running,
# whatever that kernel does: a step made of small fp32 matmuls, int8 dequantisation and
# elementwise kernels reads near 100 % while the tensor cores idle. MFU divides the useful
# arithmetic by what the chip could do in the same time; it is the number that says how much
# faster the same step could be.

# %%
util = summ["gpu_util_pct_mean"]
if monitor.gpu:
    print(f"GPU utilisation {util:.0f} % vs MFU {100 * m['mfu']:.1f} %: the GPU was busy, "
          f"and did {100 * m['mfu']:.1f} % of the arithmetic it could have")
else:
    print("no GPU here: utilisation not sampled; MFU above is against the CPU's measured matmul peak")

# %% [markdown]
# ## FLOPs and MACs per step vs batch size (study Fig. 10, 11)
#
# Analytic, for this model, recipe and sequence length. Every term is proportional to the
# number of tokens, so FLOPs per step grow linearly with the batch size; the profilers agree
# (`benchmarks/profile_flops.py` checks it on a GPU).

# %%
bss = [1, 2, 4, 7, 8]
rows = []
for b in bss:
    f = F.recipe_step_flops(mcfg, rec, b, seq_len)
    rows.append({"batch size": b, "model TFLOPs": f.model_flops / 1e12, "hardware TFLOPs": f.hardware_flops / 1e12,
                 "TMACs": f.macs / 1e12, "DeepSpeed-convention TFLOPs (3 x fwd)": 3 * f.forward / 1e12})
per_bs = pd.DataFrame(rows)
slope, icpt, r2 = F.linear_fit_r2(per_bs["batch size"].tolist(), per_bs["model TFLOPs"].tolist())
display(per_bs.style.format(precision=4).hide(axis="index"))
print(f"model FLOPs per step = {slope:.4f} TFLOPs x batch size + {icpt:.1e} (R^2 = {r2:.6f})")
fig = go.Figure()
for col in ("model TFLOPs", "hardware TFLOPs", "DeepSpeed-convention TFLOPs (3 x fwd)", "TMACs"):
    fig.add_trace(go.Scatter(x=per_bs["batch size"], y=per_bs[col], mode="lines+markers", name=col))
fig.update_layout(title=f"FLOPs and MACs per step vs batch size ({cfg.model}, {rec.name}, seq {seq_len})",
                  xaxis_title="batch size", yaxis_title="per step (TFLOPs / TMACs)")
fig.show()

# %%
result = {"model": cfg.model, "recipe": rec.name, "batch_size": batch_size, "seq_len": seq_len, "device": str(dev),
          "analytic": a.as_dict(), "flop_counter": {k: v for k, v in counted.items() if k != "by_op"},
          "deepspeed": ds, "step_time_s": step_time_s, "step_time_source": source,
          "peak_measured_tflops": peak_measured, "peak_sheet_tflops": peak_sheet, **m, "monitor": summ}
print("wrote", write_json(out, f"bs{batch_size}/profile.json", result))
print(json.dumps({k: result[k] for k in ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu", "hfu")}, indent=1))
