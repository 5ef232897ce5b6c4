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
model = "tiny"
tokenizer = ""
data = "builtin"
recipe = "seed"
attn = ""  # "" = the recipe's attention
batch_size = 1
seq_len = 2048
packing = True
epochs = 1
max_steps = 0  # 0 = whole epochs
gpu_memory_gib = 0.0  # 0 = whole card
device = "auto"
seed = 42
run_dir = ""  # "" = a temporary folder
nproc = 1  # GPUs (processes) per node; > 1 trains under torchrun, batch_size is per GPU
strategy = "auto"  # ddp | fsdp | auto (the memory model decides)
grad_accum = 1  # global batch = batch_size x GPUs x grad_accum
nnodes = 1
node_rank = 0
master_addr = "127.0.0.1"
master_port = 29500

# %%
import json
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from loralab import study
from loralab.data import load_splits, tokenize_splits
from loralab.gpu_monitor import GpuMonitor
from loralab.memory import GIB, predict_peak
from loralab.model import load_for_training
from loralab.report import banner, config_table, run_config_from_params, setup_plotly
from loralab.train import train

setup_plotly()
banner(model)
cfg = run_config_from_params(model, tokenizer, data, recipe, attn, batch_size, seq_len, packing, epochs,
                             max_steps, gpu_memory_gib, device, seed)
out_dir = Path(run_dir) / f"bs{batch_size}" if run_dir else Path(tempfile.mkdtemp(prefix="loralab-"))
print(f"batch size {batch_size}, recipe {cfg.recipe.name}, results in {out_dir}")
distributed = nproc * nnodes > 1 or grad_accum > 1  # then torchrun trains, this kernel only reports
if distributed:
    print(f"{nproc * nnodes} GPU(s) ({nnodes} node(s)), strategy {strategy}: global batch = {batch_size} per GPU "
          f"x {nproc * nnodes} GPUs x {grad_accum} accumulation = {batch_size * nproc * nnodes * grad_accum}")

# %% [markdown]
# ## The recipe, resolved
# Every knob this run used.

# %%
config_table(cfg)

# %% [markdown]
# ## Model and data

# %%
if distributed:  # the ranks load the model themselves; here only its shape and the data counts
    from loralab.train_entry import model_config_of
    from loralab.model import resolve_model_folder, resolve_tokenizer_path, is_preset
    from loralab.tokenizer import load_tokenizer
    from loralab.train_entry import SHAPES
    model_config = model_config_of(cfg)
    tok = load_tokenizer(cfg.tokenizer if cfg.model in SHAPES else resolve_tokenizer_path(cfg, resolve_model_folder(cfg.model)))
    info = {"random_weights": is_preset(cfg.model) or cfg.model in SHAPES, "trainable_params": None}
else:
    model_obj, tok, info = load_for_training(cfg)
    model_config = model_obj.config
tsplits = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)
train_split = tsplits["train"]
gpus = nproc * nnodes
info_table = {**info, "train rows": len(train_split.rows),
              "steps per epoch": len(train_split.rows) // (batch_size * gpus * grad_accum)}
pd.DataFrame(info_table.items(), columns=["item", "value"])

# %% [markdown]
# ## Predicted peak memory (before training)
#
# loralab's analytic memory model (notebook 02) for this recipe, batch size and sequence length.

# %%
if distributed:
    from loralab.distributed import predict_peak_distributed
    from loralab.train_entry import resolve_strategy
    import torch
    strategy = resolve_strategy(strategy, cfg, gpus, torch.device("cuda", 0) if torch.cuda.is_available() and device != "cpu" else torch.device("cpu"))
    print(f"strategy: {strategy}; the prediction is per GPU")
    prediction = predict_peak_distributed(model_config, cfg.recipe, batch_size, cfg.seq_len, gpus, strategy)
else:
    prediction = predict_peak(model_config, cfg.recipe, batch_size, cfg.seq_len)
predicted_reserved_gib = prediction.reserved / GIB
print(f"predicted peak: {predicted_reserved_gib:.2f} GiB reserved by PyTorch, "
      f"{prediction.total / GIB:.2f} GiB device used (CUDA context included); peak during {prediction.phase}")
display(Markdown(prediction.markdown()))

# %% [markdown]
# ## Training
#
# One JSON line per step goes to `steps.jsonl`; a background monitor samples GPU
# utilisation and memory (host CPU and memory on a machine without a GPU).

# %%
if distributed:
    from dataclasses import fields
    from loralab.distributed import LaunchArgs, launch
    from loralab.train import TrainResult
    la = LaunchArgs(nproc=nproc, strategy=strategy, grad_accum=grad_accum, nnodes=nnodes, node_rank=node_rank,
                    master_addr=master_addr, master_port=master_port)
    with GpuMonitor(interval_s=0.5) as monitor:
        dist_result = launch(cfg, out_dir, la)
    known = {f.name for f in fields(TrainResult)}
    required = {"status": "error", "batch_size": batch_size, "steps_per_epoch": 0, "steps_done": 0,
                "total_steps": 0, "tokens_per_step": 0}
    result = TrainResult(**{**required, **{k: v for k, v in dist_result.items() if k in known and v is not None}})
    result_d = {**dist_result, **result.to_dict()}
else:
    with GpuMonitor(interval_s=0.5) as monitor:
        result = train(cfg, model_obj, train_split, out_dir, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    result_d = result.to_dict()
samples = monitor.dataframe()
samples.to_csv(out_dir / "monitor.csv", index=False)
result_d["predicted_peak_gib"] = predicted_reserved_gib
result_d["predicted_device_gib"] = prediction.total / GIB
result_d["random_weights"] = info["random_weights"]
result_d["trainable_params"] = info["trainable_params"] or result_d.get("trainable_params")
(out_dir / "train_result.json").write_text(json.dumps(result_d, indent=1))

# %% [markdown]
# ## Result

# %%
if result.status == "oom":
    display(Markdown(f"**Out of memory** at step {result.oom_memory['at_step']} with batch size {batch_size}"
                     f"{f' under a {gpu_memory_gib:g} GiB cap' if gpu_memory_gib else ''}. "
                     f"Memory at the failure: `{result.oom_memory}`. The sweep goes on with the next batch size."))
rows = {
    "status": result.status,
    "steps run": f"{result.steps_done} of {result.total_steps} ({result.steps_per_epoch} per epoch)",
    "final loss": None if result.final_loss is None else round(result.final_loss, 4),
    "throughput": None if result.tokens_per_s is None else f"{result.tokens_per_s:,.0f} tok/s",
    "step time": None if result.step_time_s is None else f"{result.step_time_s:.3f} s",
    "epoch time": None if result.epoch_time_s is None else f"{result.epoch_time_s:,.0f} s ({result.epoch_time_kind})",
    "peak allocated": None if result.peak_allocated_gib is None else f"{result.peak_allocated_gib:.2f} GiB",
    "peak reserved": None if result.peak_reserved_gib is None else f"{result.peak_reserved_gib:.2f} GiB",
    "peak device used (as nvidia-smi, CUDA context incl.)": None if result.peak_device_used_gib is None else f"{result.peak_device_used_gib:.2f} GiB",
    "predicted peak reserved": f"{predicted_reserved_gib:.2f} GiB",
}
if batch_size in study.PEAK_MEMORY_GIB:
    s = study.PEAK_MEMORY_GIB[batch_size]
    rows["study peak (A100-40GB)"] = "out of memory" if s is None else f"{s} GiB ({study.PEAK_MEMORY_NOTE[batch_size]})"
if batch_size in study.EPOCH_TIME_S:
    rows["study epoch time (A100-40GB)"] = f"{study.EPOCH_TIME_S[batch_size]:,.0f} s"
pd.DataFrame(rows.items(), columns=["measure", "value"])

# %% [markdown]
# ## Loss per step (the study's Figures 7 and 8)

# %%
steps = pd.read_json(out_dir / "steps.jsonl", lines=True) if (out_dir / "steps.jsonl").exists() and (out_dir / "steps.jsonl").stat().st_size else pd.DataFrame()
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
    fig.add_hline(y=predicted_reserved_gib, line_dash="dot", annotation_text="predicted peak reserved")
    if gpu_memory_gib:
        fig.add_hline(y=gpu_memory_gib, line_color="red", annotation_text=f"{gpu_memory_gib:g} GiB cap")
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
if distributed:
    per = pd.DataFrame(result_d.get("per_rank") or [])
    display(Markdown(f"**{result_d.get('world_size')} GPUs, {result_d.get('strategy')}**: batch {batch_size} per GPU x "
                     f"{result_d.get('world_size')} GPUs x {result_d.get('grad_accum')} accumulation = global batch "
                     f"{result_d.get('global_batch_size')}; "
                     + (f"{result_d['tokens_per_s']:,.0f} tok/s in total, {result_d['tokens_per_s_per_gpu']:,.0f} tok/s per GPU; "
                        if result_d.get("tokens_per_s") else "")
                     + f"predicted peak reserved per GPU {predicted_reserved_gib:.2f} GiB."))
    display(per.rename(columns=lambda c: c.replace("_gib", " (GiB)")))
    if len(steps) and "ranks" in steps:
        fig = go.Figure()
        for r in range(int(result_d.get("world_size") or 1)):
            y = [row[r]["peak_reserved_gib"] for row in steps["ranks"]]
            if any(v is not None for v in y):
                fig.add_trace(go.Scatter(x=steps["step"], y=y, name=f"GPU {r}", mode="lines+markers"))
        if fig.data:
            fig.add_hline(y=predicted_reserved_gib, line_dash="dot", annotation_text="predicted per GPU")
            fig.update_layout(title="Peak reserved per GPU per step (GiB)", xaxis_title="step", yaxis_title="GiB", height=320)
            fig.show()
        else:
            print("CPU run: no GPU memory per rank to show")
else:
    print("one process: see the sections above")
