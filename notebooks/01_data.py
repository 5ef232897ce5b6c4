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
# # 01 · Data: dialogues, the prompt, packing and steps per epoch
#
# The study trains on SAMSum with llama-recipes' prompt, concatenates every tokenized
# prompt of a split and cuts the stream into 2048-token chunks (the tail dropped), with
# the loss on every token. This notebook shows each of those steps on the chosen data,
# and how many optimizer steps an epoch takes at each batch size.

# %% tags=["parameters"]
model = "tiny"  # its tokenizer is used: preset, Hugging Face folder, or Meta checkpoint folder
tokenizer = ""  # tokenizer.model file or folder; empty = the one in the model folder
data = "builtin"  # builtin, a SAMSum folder, a .json/.jsonl/.csv/.parquet file, or a saved dataset folder
recipe = ""  # empty = the default for the model (demo for tiny: one dialogue per row; seed: packed, as the study)
seq_len = 2048  # tokens per packed chunk (the study: 2048)
batch_sizes = [1, 4, 7, 8]  # steps per epoch are shown for these
run_dir = ""  # empty = a new folder under outputs/notebooks/
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
import pandas as pd
import plotly.express as px

from loralab import data_prep
from loralab.report import banner, notebook_config, setup_plotly, table
from loralab.run_folder import RunFolder

setup_plotly()
cfg = notebook_config(config, model=model, tokenizer=tokenizer, data=data, recipe=recipe, seq_len=seq_len,
                      batch_sizes=batch_sizes)
run = RunFolder.for_notebook(run_dir, "01_data")
banner(cfg)
result = data_prep.prepare(cfg, run)
print(f"data: {result.source}\ntokenizer: {result.tokenizer}\npacking: {result.packing} (recipe {cfg.recipe.name}), "
      f"seq_len {result.seq_len}")

# %% [markdown]
# ## The dialogues

# %%
table(result.dialogues)

# %%
pd.set_option("display.max_colwidth", 200)
table(result.examples)

# %% [markdown]
# ## The prompt
#
# Each training example is `BOS + prompt + summary + EOS` (llama-recipes' template; its
# `{eos_token}` is the literal `</s>`, which the Llama tokenizer maps to the EOS id 2).

# %%
print(repr(result.prompt_template))
print(result.example_prompt)
ids = result.example_ids
print(f"\n{len(ids)} tokens; first ids {ids[:8]}, last ids {ids[-4:]} (EOS = {result.eos_id})")

# %% [markdown]
# ## Token lengths and packing

# %%
fig = px.histogram(pd.DataFrame({"tokens": result.train_lengths}), x="tokens", nbins=60,
                   title="Train prompt lengths (tokens, with BOS/EOS)")
fig.update_layout(height=350, yaxis_title="prompts")
fig.show()

# %%
table(result.splits, precision=1)

# %% [markdown]
# ## Steps per epoch
#
# llama-recipes' DataLoader is sequential with `drop_last=True`: steps = chunks // batch size.

# %%
table([{"batch size": b, "steps per epoch": n, "tokens per step": b * result.seq_len,
        "study": study_steps if (study_steps := result.study_steps_per_epoch(b)) is not None else "–"}
       for b, n in result.steps_per_epoch.items()])
