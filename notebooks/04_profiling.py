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
import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display
from plotly.subplots import make_subplots

from loralab import profiling, study
from loralab.report import banner, notebook_config, setup_plotly, table
from loralab.run_folder import RunFolder

setup_plotly()
cfg = notebook_config(config, model=model, recipe=recipe, batch_sizes=[batch_size], seq_len=seq_len,
                      device=device).at_batch(batch_size)
run = RunFolder.for_notebook(run_dir, "04_profiling")
banner(cfg)
rec = cfg.recipe
print(f"recipe {rec.name}: quantization {rec.quantization}, params {rec.param_dtype}, autocast {rec.autocast}, "
      f"checkpointing {rec.gradient_checkpointing}, attention {rec.attn_implementation}, LoRA r{rec.lora_r} on "
      f"{', '.join(rec.lora_targets)}")

# %% [markdown]
# ## Profiling one step
#
# One library call (`loralab.profiling.run`): the analytic count, torch's `FlopCounterMode` and DeepSpeed's
# profiler on one real step of a random-weight model in the run's shape, the step time (from the run's
# training at this batch size when it ran, else timed here), the matmul peak, and device samples meanwhile.

# %%
result = profiling.run(cfg, run)
if result.seq_len_note:
    print(result.seq_len_note)
print(f"batch size {batch_size} x seq {result.seq_len} = {batch_size * result.seq_len:,} tokens per step, "
      f"device {result.device}")

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
a = result.analytic
parts = [("frozen weights: forward", a["frozen_fwd"]), ("frozen weights: input grad", a["frozen_bwd"]),
         ("LoRA: forward", a["lora_fwd"]), ("LoRA: weight + input grads", a["lora_bwd"]),
         ("attention: forward", a["attn_fwd"]), ("attention: backward", a["attn_bwd"]),
         ("LM head: forward", a["head_fwd"]), ("LM head: input grad", a["head_bwd"]),
         ("= model FLOPs", a["model_flops"]),
         ("checkpoint recompute (1 forward per layer)", a["checkpoint_recompute"]),
         ("fused-attention backward recompute", a["attn_kernel_recompute"]),
         ("= hardware FLOPs", a["hardware_flops"])]
t = pd.DataFrame(parts, columns=["part", "FLOPs"])
t["GFLOP"] = t["FLOPs"] / 1e9
t["% of model FLOPs"] = 100 * t["FLOPs"] / a["model_flops"]
display(t.style.format({"FLOPs": "{:,.0f}", "GFLOP": "{:,.3f}", "% of model FLOPs": "{:.1f}"}).hide(axis="index"))
print(f"MACs per step: {a['macs'] / 1e9:,.3f} GMAC (= model FLOPs / 2)")
print(f"attention counted causally (FlashAttention's convention) would give {result.causal_model_flops / 1e9:,.3f} GFLOP "
      f"model FLOPs ({100 * (1 - result.causal_model_flops / a['model_flops']):.1f} % less); loralab uses the full matrix "
      f"(PaLM, Megatron, and both profilers)")

# %% [markdown]
# ## Two profilers on one real step
#
# `FlopCounterMode` counts each matmul-like aten op as it executes: with checkpointing it
# sees the recompute, with fused attention it sees the kernel's backward recompute, so it
# matches the analytic **hardware** count. DeepSpeed counts one forward (matmuls plus some
# elementwise ops) and reports a training step as 3 x forward.

# %%
by_op = pd.Series(result.flop_counter_by_op, name="FLOPs").sort_values(ascending=False).rename_axis("aten op").reset_index()
display(by_op.style.format({"FLOPs": "{:,.0f}"}).hide(axis="index"))
ds, counted = result.deepspeed, result.flop_counter
cmp = pd.DataFrame([
    ("analytic: model FLOPs", a["model_flops"], "what the step needs"),
    ("analytic: hardware FLOPs", a["hardware_flops"], "+ recompute"),
    ("torch FlopCounterMode", counted["total"], counted["convention"]),
    ("DeepSpeed: forward", ds["forward_flops"], "one forward, incl. some elementwise ops"),
    ("DeepSpeed: step = 3 x forward", ds["step_flops_ds_convention"], ds["convention"]),
], columns=["source", "FLOPs per step", "convention"])
cmp["GFLOP per step"] = cmp["FLOPs per step"].astype(float) / 1e9
cmp["vs analytic hardware (x)"] = cmp["FLOPs per step"].astype(float) / a["hardware_flops"]
display(cmp[["source", "GFLOP per step", "vs analytic hardware (x)", "convention"]].style.format(
    {"GFLOP per step": "{:,.3f}", "vs analytic hardware (x)": "{:.3f}"}, na_rep="– (not run)").hide(axis="index"))
if ds["available"]:
    print(f"DeepSpeed: {ds['forward_macs'] / 1e9:,.3f} GMAC forward, {ds['params']:,} parameters")
else:
    print(f"DeepSpeed profiler not run: {ds['error']}")
if result.quantization != "none":
    display(Markdown(
        f"**{result.quantization} caveat.** The frozen weights are bitsandbytes {result.quantization} modules. On a GPU "
        "their forward runs in bitsandbytes' own kernels, which neither `FlopCounterMode` nor DeepSpeed's patched "
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
st = result.step_time_s
gpu = result.device.startswith("cuda")
print(f"step time {st:.3f} s (median; {result.step_time_source}); {batch_size * result.seq_len / st:,.0f} tok/s")
print(f"achieved {result.tflops_per_s:.3f} TFLOP/s (model FLOPs), {result.hardware_flops_per_step / st / 1e12:.3f} "
      f"TFLOP/s (hardware)")
print(f"peak: data sheet {result.peak_sheet_tflops or '-'} TFLOP/s bf16 dense; measured matmul "
      f"{result.peak_measured_tflops:.3f} TFLOP/s ({'bf16' if gpu else 'fp32, CPU'})")
print(f"MFU {100 * result.mfu:.2f} %, HFU {100 * result.hfu:.2f} % (vs {result.peak_tflops:.3g} TFLOP/s); "
      f"MFU vs measured matmul peak {100 * result.tflops_per_s / result.peak_measured_tflops:.2f} %")
if result.study_epoch_steps:
    steps_epoch = result.study_epoch_steps
    print(f"epoch time on SAMSum packed at 2048 ({steps_epoch} steps at bs {batch_size}): "
          f"{steps_epoch * st:,.0f} s = {steps_epoch * st / 3600:.2f} h"
          + (f" (study on an A100: {study.EPOCH_TIME_S[batch_size]:,.0f} s)" if batch_size in study.EPOCH_TIME_S else ""))

# %% [markdown]
# ## GPU use over time
#
# nvitop samples the device in the background: utilisation, memory used (whole device) and
# power. Without an NVIDIA driver (CI, a laptop) only the host is sampled.

# %%
mon = pd.DataFrame(result.monitor_samples)
if result.gpu_sampled:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True,
                        subplot_titles=("GPU utilisation (%)", "device memory used (GiB)", "power (W)"))
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.gpu_util_pct, name="util %"), row=1, col=1)
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.mem_used_gib, name="GiB"), row=2, col=1)
    fig.add_trace(go.Scatter(x=mon.t_s, y=mon.power_w, name="W"), row=3, col=1)
else:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True,
                        subplot_titles=("host CPU (%, no NVML here)", "host memory used (GiB)"))
    if len(mon):
        fig.add_trace(go.Scatter(x=mon.t_s, y=mon.host_cpu_pct, name="CPU %"), row=1, col=1)
        fig.add_trace(go.Scatter(x=mon.t_s, y=mon.host_mem_gib, name="GiB"), row=2, col=1)
fig.update_xaxes(title_text="time (s)")
fig.update_layout(height=600, showlegend=False, title=f"{rec.name}, batch size {batch_size}")
fig.show()
summ = result.monitor
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
if result.gpu_sampled:
    print(f"GPU utilisation {summ['gpu_util_pct_mean']:.0f} % vs MFU {100 * result.mfu:.1f} %: the GPU was busy, "
          f"and did {100 * result.mfu:.1f} % of the arithmetic it could have")
else:
    print("no GPU here: utilisation not sampled; MFU above is against the CPU's measured matmul peak")

# %% [markdown]
# ## FLOPs and MACs per step vs batch size (study Fig. 10, 11)
#
# Analytic, for this model, recipe and sequence length. Every term is proportional to the
# number of tokens, so FLOPs per step grow linearly with the batch size; the profilers agree
# (`benchmarks/profile_flops.py` checks it on a GPU).

# %%
per_bs = pd.DataFrame(result.per_batch_size)
display(per_bs.style.format(precision=4).hide(axis="index"))
fit = result.linear_fit
print(f"model FLOPs per step = {fit['slope']:.4f} TFLOPs x batch size + {fit['intercept']:.1e} (R^2 = {fit['r2']:.6f})")
fig = go.Figure()
for col in ("model TFLOPs", "hardware TFLOPs", "DeepSpeed-convention TFLOPs (3 x fwd)", "TMACs"):
    fig.add_trace(go.Scatter(x=per_bs["batch size"], y=per_bs[col], mode="lines+markers", name=col))
fig.update_layout(title=f"FLOPs and MACs per step vs batch size ({cfg.model}, {rec.name}, seq {result.seq_len})",
                  xaxis_title="batch size", yaxis_title="per step (TFLOPs / TMACs)")
fig.show()

# %%
table([{k: getattr(result, k) for k in ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu", "hfu")}], precision=4)
