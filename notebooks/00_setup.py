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
# # 00 · Setup: environment, GPU and the model
#
# What this machine is, which versions run the study, and which model the rest of the
# sweep fine-tunes: a built-in preset, a Hugging Face folder, or a Meta checkpoint that
# loralab converts to Hugging Face format here (transformers no longer ships a converter).

# %% tags=["parameters"]
model = "tiny"  # preset (tiny, llama2-7b, llama2-13b), Hugging Face folder, or Meta checkpoint folder
tokenizer = ""  # tokenizer.model file or folder; empty = the one in the model folder
device = "auto"  # auto, cpu or cuda
gpu_memory_gib = 0.0  # 0 = the whole card; 40 emulates the A100-40GB of the study
run_dir = ""  # empty = a new folder under outputs/notebooks/
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
import pandas as pd
import torch

from loralab.device import gpu_info, resolve_device, versions
from loralab.model import resolve_model_folder
from loralab.report import banner, notebook_config, notebook_run_dir, write_json
from loralab.shape import ModelShape, model_config

cfg = notebook_config(config, model=model, tokenizer=tokenizer, device=device, gpu_memory_gib=gpu_memory_gib or None)
out = notebook_run_dir(run_dir, "00_setup")
banner(cfg)

# %% [markdown]
# ## Environment

# %%
env = versions()
dev = resolve_device(cfg.device)
if dev.type == "cuda":
    free, total = torch.cuda.mem_get_info(dev)
    g = gpu_info()
    env.update({"gpu": g["name"], "driver": g["driver"] or "unknown", "compute_capability": g["compute_capability"],
                "gpu_memory_gib": round(total / 2**30, 2), "gpu_free_gib": round(free / 2**30, 2)})
    env["memory_cap"] = f"{cfg.gpu_memory_gib:g} GiB cap (emulated card)" if cfg.gpu_memory_gib else "whole card"
else:
    env.update({"gpu": "none (CPU run)", "cpu": gpu_info()["name"], "cpu_threads": torch.get_num_threads(),
                "memory_cap": "n/a (no GPU)"})
pd.DataFrame(env.items(), columns=["item", "value"]).style.hide(axis="index")

# %% [markdown]
# ## The model
#
# Presets on disk are built once, saved as a Hugging Face folder, and from then on loaded through
# `from_pretrained` exactly like real weights, so quantization is the real bitsandbytes path.
# A Meta checkpoint (`params.json`, `consolidated.*.pth`, `tokenizer.model`) is converted once.
# `llama2-13b` is built in memory by each training process and never written to disk.

# %%
folder = resolve_model_folder(cfg.model)
shape = ModelShape.of(model_config(str(folder) if folder else cfg.model))
n_params = shape.total_params()
model_info = {
    "source": cfg.model, "folder": str(folder) if folder else "– (built in memory by each process)",
    "random weights": "yes: memory, time and FLOPs are real; loss and summaries are not" if cfg.random_weights else "no",
    "layers": shape.L, "hidden": shape.H, "intermediate": shape.I, "heads": shape.nh, "kv heads": shape.nkv,
    "vocab": shape.V, "parameters": f"{n_params:,} ({n_params / 1e9:.2f} B)",
}
pd.DataFrame(model_info.items(), columns=["item", "value"]).style.hide(axis="index")

# %%
write_json(out, "results/setup.json", {"environment": env, "model_folder": str(folder) if folder else None,
                                       "random_weights": cfg.random_weights, "parameters": n_params})
print(f"model ready: {folder or cfg.model}")
