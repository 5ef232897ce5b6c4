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
# # 06 · Report across batch sizes
#
# The study's Tables 3 and 4 and Figures 7 to 11 with loralab's measurements beside the
# published ones, and the memory model's prediction beside each measurement.

# %% tags=["parameters"]
run_dir = ""  # a run folder written by run_all.py; empty = the newest one under outputs/
config = {}  # run_all.py passes the configuration of the whole run here; empty = the run folders run_config.json

# %%
import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from loralab import study
from loralab.config import RunConfig
from loralab.report import banner, setup_plotly, table
from loralab.run_folder import RunFolder, SweepReport

setup_plotly()
run = RunFolder(run_dir) if run_dir else RunFolder.latest()
if run is None:
    display(Markdown("> **No run yet.** Run `python run_all.py` (or notebook 03) first; this report reads its folder."))
cfg = RunConfig.from_dict(config) if config else (run.load_config() if run else RunConfig())
banner(cfg)
print(f"run folder: {run.path if run else None}")
report = run.report(cfg) if run else SweepReport(run=None)
batch_sizes = report.batch_sizes
recipe, gpu_memory_gib = cfg.recipe.name, cfg.gpu_memory_gib
env = report.environment
card = gpu_memory_gib or env.get("gpu_memory_gib")
gpu = env.get("gpu", "unknown")
val, status = report.value, report.status


# %% [markdown]
# ## At a glance

# %%
ok = [bs for bs in batch_sizes if status(bs) == "ok"]
oom = [bs for bs in batch_sizes if status(bs) == "oom"]
lines = [f"- **GPU:** {gpu}" + (f", capped at **{gpu_memory_gib:g} GiB** to emulate the study's A100-40GB" if gpu_memory_gib else ""),
         f"- **Recipe:** `{recipe}`; **trained:** batch sizes {ok or 'none'}; **out of memory:** {oom or 'none'}"]
if ok:
    best = max(ok, key=lambda b: val(b, "tokens_per_s") or 0)
    lines.append(f"- **Fastest:** batch size {best} at {val(best, 'tokens_per_s'):,.0f} tok/s; "
                 f"epoch {val(best, 'epoch_time_s'):,.0f} s ({val(best, 'epoch_time_kind')})")
if report.autobatch:
    lines.append(f"- **Batch size chosen automatically:** {report.autobatch.line}")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Table 3: memory per batch size
#
# The study's figure is device memory in use as a monitor shows it (CUDA context included),
# read on a 40 GiB A100. loralab shows three measures side by side: *allocated* (tensors),
# *reserved* (PyTorch's caching allocator), *device used* (what `nvidia-smi` shows), plus the
# memory model's prediction of reserved memory made before training.

# %%
rows = []
for bs in batch_sizes:
    used = val(bs, "peak_device_used_gib")
    pred = val(bs, "predicted_peak_gib")
    reserved = val(bs, "peak_reserved_gib")
    s = study.PEAK_MEMORY_GIB.get(bs, "–")
    rows.append({
        "batch size": bs, "status": status(bs), "steps per epoch": val(bs, "steps_per_epoch"),
        "card (GiB)": card if card else "– (CPU run)",
        "allocated (GiB)": val(bs, "peak_allocated_gib"), "reserved (GiB)": reserved, "device used (GiB)": used,
        "free (GiB)": None if (used is None or not card) else card - used,
        "predicted reserved (GiB)": pred,
        "prediction error (%)": None if not (pred and reserved) else 100 * (pred - reserved) / reserved,
        "study used (GiB)": "out of memory" if s is None else s,
        "study steps per epoch": study.STEPS_PER_EPOCH.get(bs, "–"),
    })
table3 = pd.DataFrame(rows)
table(table3)

# %% [markdown]
# ## Table 4: epoch time
#
# Measured over the steps that ran and extrapolated to the whole epoch where the run was
# shorter than an epoch (the `how` column says which).

# %%
table4 = pd.DataFrame([{
    "batch size": bs, "status": status(bs), "throughput (tok/s)": val(bs, "tokens_per_s"), "step time (s)": val(bs, "step_time_s"),
    "epoch time (s)": val(bs, "epoch_time_s"), "how": val(bs, "epoch_time_kind"),
    "study epoch time (s)": study.EPOCH_TIME_S.get(bs, "–"),
    "study throughput (tok/s)": round(study.TOKENS_PER_S[bs]) if bs in study.TOKENS_PER_S else "–",
} for bs in batch_sizes])
table(table4)

# %% [markdown]
# ## Several GPUs
#
# Shown when the sweep ran under torchrun (`--nproc N`): batch sizes are per GPU; the global
# batch is per-GPU batch x GPUs x accumulation steps, and each GPU's peak memory is listed.

# %%
multi = {bs: r for bs, r in report.training.items() if r and r.world_size > 1}
if multi:
    rows = []
    for bs, r in multi.items():
        base = {"batch size per GPU": bs, "GPUs": r.world_size, "accumulation": r.grad_accum,
                "global batch": r.global_batch_size, "strategy": r.strategy,
                "throughput, all GPUs (tok/s)": r.tokens_per_s, "throughput per GPU (tok/s)": r.tokens_per_s_per_gpu}
        for pr in r.per_rank or []:
            base[f"GPU {pr['rank']} peak reserved (GiB)"] = pr.get("peak_reserved_gib")
        rows.append(base)
    display(table(rows))
else:
    print("single-process run (no torchrun): see the tables above")

# %% [markdown]
# ## Scaling: this run against a reference on fewer GPUs
#
# With `run_all.py --scaling-reference RUN_DIR` (an earlier run of the same model, recipe and
# sequence length): tokens/s per batch size per GPU in both runs, the speed-up, and the
# efficiency = speed-up / (GPUs here / GPUs there). Batch sizes are per GPU in both runs.

# %%
scaling = report.scaling.rows if report.scaling else []
if report.scaling:
    if scaling:
        display(table(scaling, precision=3))
        fig = go.Figure()
        xs = [f"bs {r['batch size per GPU']}" for r in scaling]
        fig.add_bar(name=f"reference ({scaling[0]['GPUs (reference)']} GPU)", x=xs, y=[r["tokens/s (reference)"] for r in scaling])
        fig.add_bar(name=f"this run ({scaling[0]['GPUs (this run)']} GPUs)", x=xs, y=[r["tokens/s (this run)"] for r in scaling],
                    text=[f"{r['speed-up']:.2f}x" for r in scaling], textposition="outside")
        fig.add_scatter(name="linear scaling", x=xs, mode="markers", marker_symbol="line-ew-open", marker_size=40,
                        y=[r["tokens/s (reference)"] * r["GPUs (this run)"] / r["GPUs (reference)"] for r in scaling])
        fig.update_layout(title="Throughput: this run vs the reference (same batch size per GPU)", yaxis_title="tokens/s",
                          barmode="group", height=380)
        fig.show()
    else:
        print(f"no batch size trained in both this run and the reference {report.scaling.reference}")
else:
    print("no --scaling-reference given: nothing to compare against")

# %% [markdown]
# ## Training loss per step (the study's Figures 7 and 8)

# %%
fig = go.Figure()
for bs in batch_sizes:
    if report.steps.get(bs):
        steps = pd.DataFrame(report.steps[bs])
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["loss"], name=f"bs {bs}", mode="lines"))
fig.update_layout(title="Training loss per step", xaxis_title="step", yaxis_title="loss", height=380)
fig.show()

# %% [markdown]
# ## Memory vs batch size

# %%
fig = go.Figure()
xs = [bs for bs in batch_sizes if report.training.get(bs)]
for key, name in [("peak_allocated_gib", "allocated"), ("peak_reserved_gib", "reserved"),
                  ("peak_device_used_gib", "device used"), ("predicted_peak_gib", "predicted reserved")]:
    fig.add_trace(go.Scatter(x=xs, y=[val(b, key) for b in xs], name=name, mode="lines+markers"))
sx = [b for b in batch_sizes if study.PEAK_MEMORY_GIB.get(b)]
fig.add_trace(go.Scatter(x=sx, y=[study.PEAK_MEMORY_GIB[b] for b in sx], name="study (A100-40GB)",
                         mode="markers", marker_symbol="x", marker_size=12))
if card:
    fig.add_hline(y=card, line_color="red", annotation_text=f"card {card:g} GiB")
fig.update_layout(title="Peak memory vs batch size (GiB)", xaxis_title="batch size", yaxis_title="GiB", height=380)
fig.show()

# %% [markdown]
# ## FLOPs, MACs and MFU per step (the study's Figures 10 and 11)
#
# From notebook 04. FLOPs per step should grow linearly with batch size, as the study saw.
# loralab's analytic LoRA count (frozen weights: forward + input gradient, no weight gradient) is
# the reference; DeepSpeed's profiler, which the study used, assumes full training and cannot see
# bitsandbytes' int8/4-bit kernels, so its line is shown for comparison, not as the truth.

# %%
prof_rows = [{"batch size": bs, **{k: getattr(p, k) for k in ("flops_per_step", "macs_per_step", "tflops_per_s", "mfu")}}
             for bs, p in report.profiles.items() if p]
if prof_rows:
    prof = pd.DataFrame(prof_rows)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=prof["batch size"], y=prof["flops_per_step"] / 1e12, name="TFLOPs per step", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=prof["batch size"], y=prof["macs_per_step"] / 1e12, name="TMACs per step", mode="lines+markers"))
    ds = [(bs, (p.deepspeed or {}).get("step_flops_ds_convention")) for bs, p in report.profiles.items() if p]
    ds = [(bs, v) for bs, v in ds if v]
    if ds:  # what the study's tool reports: full-training convention, blind to bitsandbytes kernels
        fig.add_trace(go.Scatter(x=[b for b, _ in ds], y=[v / 1e12 for _, v in ds], mode="lines+markers",
                                 name="DeepSpeed step TFLOPs (3 x forward, study's convention)", line_dash="dot"))
    fig.update_layout(title="Work per step vs batch size", xaxis_title="batch size", yaxis_title="trillions", height=350)
    fig.show()
    fig = go.Figure(go.Scatter(x=prof["batch size"], y=prof["mfu"] * 100, mode="lines+markers"))
    fig.update_layout(title="MFU vs batch size (%)", xaxis_title="batch size", yaxis_title="MFU %", height=300)
    fig.show()
    display(table(prof.rename(columns={"flops_per_step": "FLOPs per step", "macs_per_step": "MACs per step",
                                       "tflops_per_s": "achieved TFLOP/s", "mfu": "MFU (fraction)"}), precision=3))
else:
    print("no profiling results (notebook 04 not run or failed)")

# %% [markdown]
# ## Epoch time vs batch size

# %%
xs = [bs for bs in batch_sizes if val(bs, "epoch_time_s")]
fig = go.Figure(go.Bar(x=[str(b) for b in xs], y=[val(b, "epoch_time_s") for b in xs], name="loralab"))
sx = [b for b in batch_sizes if b in study.EPOCH_TIME_S]
fig.add_trace(go.Bar(x=[str(b) for b in sx], y=[study.EPOCH_TIME_S[b] for b in sx], name="study (A100-40GB)"))
fig.update_layout(title="Epoch time (s)", xaxis_title="batch size", yaxis_title="seconds", height=320, barmode="group")
fig.show()
