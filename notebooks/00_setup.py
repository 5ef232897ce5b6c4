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
model = "tiny"  # preset ("tiny", "llama2-7b"), HF folder, or Meta checkpoint folder
tokenizer = ""  # tokenizer.model file or folder; "" = the model's own
data = "builtin"
recipe = "seed"
attn = ""  # "" = the recipe's attention; "eager" or "sdpa"
device = "auto"
gpu_memory_gib = 0.0  # 0 = the whole card; 40 emulates the study's A100-40GB
run_dir = ""  # where results go ("" = don't write)

# %%
import platform
import sys

import pandas as pd
import torch

from loralab import model as lm
from loralab.report import banner, write_json

banner(model)

# %% [markdown]
# ## Environment

# %%
import importlib.metadata as md

def version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"

packages = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "nvitop",
            "papermill", "jupytext", "plotly", "rouge-score", "sentencepiece"]
env = {"python": sys.version.split()[0], "platform": platform.platform(), **{p: version(p) for p in packages}}
dev = lm.resolve_device(device)
if dev.type == "cuda":
    props = torch.cuda.get_device_properties(dev)
    free, total = torch.cuda.mem_get_info(dev)
    env.update({"gpu": props.name, "gpu_memory_gib": round(total / 2**30, 2),
                "gpu_free_gib": round(free / 2**30, 2), "cuda": torch.version.cuda,
                "compute_capability": f"{props.major}.{props.minor}"})
    try:
        import pynvml
        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # NVML missing: say so, don't fail the setup
        env["driver"] = f"unknown ({type(exc).__name__})"
else:
    env.update({"gpu": "none (CPU run)", "cpu_threads": torch.get_num_threads()})
cap = f"{gpu_memory_gib:g} GiB cap (emulated card)" if gpu_memory_gib else "whole card"
env["memory_cap"] = cap if dev.type == "cuda" else "n/a"
pd.DataFrame(env.items(), columns=["item", "value"])

# %% [markdown]
# ## The model
#
# Presets are built once, saved as a Hugging Face folder, and from then on loaded through
# `from_pretrained` exactly like real weights, so quantization is the real bitsandbytes path.
# A Meta checkpoint (`params.json`, `consolidated.*.pth`, `tokenizer.model`) is converted once.

# %%
from transformers import AutoConfig

from loralab.memory import param_count

folder = lm.resolve_model_folder(model)
mcfg = AutoConfig.from_pretrained(folder)
n_params = param_count(mcfg)  # loralab.memory: embeddings, LM head, layers, norms (GQA-aware)
random_weights = lm.is_preset(model)
model_info = {
    "source": model, "folder": str(folder), "random weights": random_weights,
    "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size, "intermediate": mcfg.intermediate_size,
    "heads": mcfg.num_attention_heads, "kv heads": mcfg.num_key_value_heads, "vocab": mcfg.vocab_size,
    "parameters": f"{n_params:,} ({n_params / 1e9:.2f} B)",
}
pd.DataFrame(model_info.items(), columns=["item", "value"])

# %%
if run_dir:
    write_json(run_dir, "results/setup.json", {"environment": env, "model_folder": str(folder),
                                               "random_weights": random_weights, "parameters": n_params})
print(f"model ready: {folder}")
