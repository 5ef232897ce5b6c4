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

from loralab import setup
from loralab.report import banner, notebook_config
from loralab.run_folder import RunFolder

cfg = notebook_config(config, model=model, tokenizer=tokenizer, device=device, gpu_memory_gib=gpu_memory_gib or None)
run = RunFolder.for_notebook(run_dir, "00_setup")
banner(cfg)

# %% [markdown]
# ## The machine and the model
#
# One library call (`loralab.setup.prepare`) collects the environment and gets the model: presets on disk are
# built once, saved as a Hugging Face folder, and from then on loaded through `from_pretrained` exactly like
# real weights, so quantization is the real bitsandbytes path. A Meta checkpoint (`params.json`,
# `consolidated.*.pth`, `tokenizer.model`) is converted once. `llama2-13b` is built in memory by each training
# process and never written to disk.

# %%
result = setup.prepare(cfg, run)
print(f"model ready: {result.model_folder or cfg.model}")

# %% [markdown]
# ## Environment

# %%
pd.DataFrame(result.environment.items(), columns=["item", "value"]).style.hide(axis="index")

# %% [markdown]
# ## The model

# %%
pd.DataFrame(result.model.items(), columns=["item", "value"]).style.hide(axis="index")
