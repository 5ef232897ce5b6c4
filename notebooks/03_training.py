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
# # 03 · Training at one batch size
#
# One LoRA fine-tuning run with the chosen recipe: the loss per step, the memory each step
# peaked at, the throughput, and the epoch time (measured, or extrapolated from the steps
# that ran). Running out of memory is a result here, not a crash: the report says at which
# step and with how much memory in use.

# %% tags=["parameters"]
model = "tiny"  # preset (tiny, llama2-7b, llama2-13b), Hugging Face folder, or Meta checkpoint folder
tokenizer = ""  # tokenizer.model file or folder; empty = the one in the model folder
data = "builtin"  # builtin, a SAMSum folder, a .json/.jsonl/.csv/.parquet file, or a saved dataset folder
recipe = ""  # empty = the default for the model: demo for the tiny model, seed (the recipe of the study) otherwise
batch_size = 1  # sequences per step (per GPU)
max_steps = 0  # 0 = the default: 300 for the tiny demo, whole epochs otherwise
device = "auto"  # auto, cpu or cuda
gpu_memory_gib = 0.0  # 0 = the whole card; 40 emulates the A100-40GB of the study
run_dir = ""  # empty = a new folder under outputs/notebooks/
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from loralab import study
from loralab.report import banner, config_table, notebook_config, setup_plotly
from loralab.results import TrainResult
from loralab.run_folder import RunFolder
from loralab.train import run_training

setup_plotly()
cfg = notebook_config(config, model=model, tokenizer=tokenizer, data=data, recipe=recipe, batch_sizes=[batch_size],
                      max_steps=max_steps or None, device=device, gpu_memory_gib=gpu_memory_gib or None).at_batch(batch_size)
run = RunFolder.for_notebook(run_dir, "03_training")
banner(cfg)
print(f"batch size {batch_size}, recipe {cfg.recipe.name}, results in {run.batch_dir(batch_size)}")
if cfg.world_size > 1:
    print(f"{cfg.world_size} GPU(s) ({cfg.nnodes} node(s)), strategy {cfg.strategy}: global batch = {batch_size} per GPU "
          f"x {cfg.world_size} GPUs x {cfg.grad_accum} accumulation = {cfg.global_batch_size}")

# %% [markdown]
# ## The recipe, resolved
# Every knob this run used.

# %%
config_table(cfg).style.hide(axis="index")

# %% [markdown]
# ## Training
#
# One library call trains (`loralab.train.run_training`): one process here, or one per GPU under torchrun.
# Before the first step it predicts the peak memory with loralab's analytic memory model (notebook 02; per GPU
# when several train). One JSON line per step goes to `steps.jsonl`; a background monitor samples GPU
# utilisation and memory (host CPU and memory on a machine without a GPU) into `monitor.csv`.

# %%
result: TrainResult = run_training(cfg, run.batch_dir(batch_size))

# %% [markdown]
# ## Predicted peak memory (before training)

# %%
if result.predicted_peak_gib is not None:
    print(f"predicted peak: {result.predicted_peak_gib:.2f} GiB reserved by PyTorch, "
          f"{result.predicted_device_gib:.2f} GiB device used (CUDA context included)"
          + (" per GPU" if result.world_size > 1 else "") + "; the terms: notebook 02")
else:
    print("no prediction: the memory model does not cover this recipe (or the model did not load)")

# %% [markdown]
# ## Result

# %%
if result.status == "oom":
    display(Markdown(f"**Out of memory** at step {result.oom_memory['at_step']} with batch size {batch_size}"
                     f"{f' under a {cfg.gpu_memory_gib:g} GiB cap' if cfg.gpu_memory_gib else ''}. "
                     f"Memory at the failure: `{result.oom_memory}`. The sweep goes on with the next batch size."))


def shown(v, fmt="{}"):
    return "–" if v is None else fmt.format(v)


rows = {
    "status": result.status,
    "steps run": f"{result.steps_done} of {result.total_steps} ({result.steps_per_epoch} per epoch)",
    "final loss": shown(result.final_loss, "{:.4f}"),
    "throughput (tok/s)": shown(result.tokens_per_s, "{:,.0f}"),
    "step time (s)": shown(result.step_time_s, "{:.3f}"),
    "epoch time (s)": shown(result.epoch_time_s, "{:,.0f}") + (f" ({result.epoch_time_kind})" if result.epoch_time_kind else ""),
    "peak allocated (GiB)": shown(result.peak_allocated_gib, "{:.2f}") if result.peak_allocated_gib is not None else "– (CPU run)",
    "peak reserved (GiB)": shown(result.peak_reserved_gib, "{:.2f}") if result.peak_reserved_gib is not None else "– (CPU run)",
    "peak device used, CUDA context incl. (GiB)": shown(result.peak_device_used_gib, "{:.2f}") if result.peak_device_used_gib is not None else "– (CPU run)",
    "predicted peak reserved (GiB)": shown(result.predicted_peak_gib, "{:.2f}"),
}
if batch_size in study.PEAK_MEMORY_GIB:
    s = study.PEAK_MEMORY_GIB[batch_size]
    rows["study peak, A100-40GB (GiB)"] = "out of memory" if s is None else f"{s} ({study.PEAK_MEMORY_NOTE[batch_size]})"
if batch_size in study.EPOCH_TIME_S:
    rows["study epoch time, A100-40GB (s)"] = f"{study.EPOCH_TIME_S[batch_size]:,.0f}"
pd.DataFrame(rows.items(), columns=["measure", "value"]).style.hide(axis="index")

# %% [markdown]
# ## Loss per step (the study's Figures 7 and 8)

# %%
steps = pd.DataFrame(run.steps(batch_size))
if len(steps):
    fig = go.Figure(go.Scatter(x=steps["step"], y=steps["loss"], mode="lines+markers", name="loss"))
    fig.update_layout(title=f"Training loss, batch size {batch_size}", xaxis_title="step", yaxis_title="loss", height=350)
    fig.show()
else:
    print("no step completed")

# %% [markdown]
# ## Memory per step
#
# *Allocated* is what tensors hold; *reserved* is what PyTorch's caching allocator holds
# from the driver; *device used* is what `nvidia-smi` (and the study) shows, CUDA context included.

# %%
if len(steps) and steps["peak_reserved_gib"].notna().any():
    fig = go.Figure()
    for col, name in [("peak_allocated_gib", "peak allocated"), ("peak_reserved_gib", "peak reserved"),
                      ("device_used_gib", "device used")]:
        fig.add_trace(go.Scatter(x=steps["step"], y=steps[col], name=name, mode="lines+markers"))
    if result.predicted_peak_gib:
        fig.add_hline(y=result.predicted_peak_gib, line_dash="dot", annotation_text="predicted peak reserved")
    if cfg.gpu_memory_gib:
        fig.add_hline(y=cfg.gpu_memory_gib, line_color="red", annotation_text=f"{cfg.gpu_memory_gib:g} GiB cap")
    fig.update_layout(title="Memory per step (GiB)", xaxis_title="step", yaxis_title="GiB", height=350)
    fig.show()
else:
    print("CPU run: no GPU memory to show (see the monitor below for host memory)")

# %% [markdown]
# ## Throughput per step

# %%
if len(steps):
    fig = go.Figure(go.Scatter(x=steps["step"], y=steps["tokens_per_s"], mode="lines+markers"))
    fig.update_layout(title="Throughput (tokens/s)", xaxis_title="step", yaxis_title="tok/s", height=300)
    fig.show()

# %% [markdown]
# ## Device over time (the study's Figure 9)
#
# Sampled in the background every 0.5 s during training (nvitop on a GPU; host metrics otherwise).

# %%
samples = pd.DataFrame(run.monitor_samples(batch_size))
if len(samples):
    fig = go.Figure()
    for col in [c for c in samples.columns if c != "t_s" and samples[c].notna().any()]:
        fig.add_trace(go.Scatter(x=samples["t_s"], y=samples[col], name=col, mode="lines"))
    fig.update_layout(title="Monitor samples over time", xaxis_title="seconds", height=350)
    fig.show()

# %% [markdown]
# ## Per GPU (when several GPUs trained)
#
# Global batch = batch per GPU x GPUs x accumulation steps. Every rank reports its own peak memory
# each step; rank 0 writes them all to `steps.jsonl`. Throughput is the whole job's and per GPU.

# %%
if result.world_size > 1:
    display(Markdown(f"**{result.world_size} GPUs, {result.strategy}**: batch {batch_size} per GPU x "
                     f"{result.world_size} GPUs x {result.grad_accum} accumulation = global batch "
                     f"{result.global_batch_size}; "
                     + (f"{result.tokens_per_s:,.0f} tok/s in total, {result.tokens_per_s_per_gpu:,.0f} tok/s per GPU; "
                        if result.tokens_per_s else "")
                     + f"predicted peak reserved per GPU {shown(result.predicted_peak_gib, '{:.2f}')} GiB."))
    display(pd.DataFrame(result.per_rank).rename(columns=lambda c: c.replace("_gib", " (GiB)")).style.hide(axis="index"))
    if len(steps) and "ranks" in steps:
        fig = go.Figure()
        for r in range(result.world_size):
            y = [row[r]["peak_reserved_gib"] for row in steps["ranks"]]
            if any(v is not None for v in y):
                fig.add_trace(go.Scatter(x=steps["step"], y=y, name=f"GPU {r}", mode="lines+markers"))
        if fig.data:
            if result.predicted_peak_gib:
                fig.add_hline(y=result.predicted_peak_gib, line_dash="dot", annotation_text="predicted per GPU")
            fig.update_layout(title="Peak reserved per GPU per step (GiB)", xaxis_title="step", yaxis_title="GiB", height=320)
            fig.show()
        else:
            print("CPU run: no GPU memory per rank to show")
else:
    print("one process: see the sections above")
