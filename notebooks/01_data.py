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

from loralab import study
from loralab.data import PROMPT_TEMPLATE, format_prompt, load_splits, prompt_ids, tokenize_splits
from loralab.model import load_tokenizer_for
from loralab.report import banner, notebook_config, notebook_run_dir, setup_plotly, write_json

setup_plotly()
cfg = notebook_config(config, model=model, tokenizer=tokenizer, data=data, recipe=recipe, seq_len=seq_len,
                      batch_sizes=batch_sizes)
out = notebook_run_dir(run_dir, "01_data")
banner(cfg)
splits = load_splits(cfg.data)
tok = load_tokenizer_for(cfg)
print(f"data: {cfg.data}\ntokenizer: {tok}\npacking: {cfg.packing} (recipe {cfg.recipe.name}), seq_len {cfg.seq_len}")

# %% [markdown]
# ## The dialogues

# %%
pd.DataFrame([{"split": k, "dialogues": len(v),
               "empty dialogues": sum(1 for e in v if not e["dialogue"].strip())} for k, v in splits.items()]).style.hide(axis="index")

# %%
pd.set_option("display.max_colwidth", 200)
pd.DataFrame([splits["train"][i] for i in range(min(3, len(splits["train"])))]).style.hide(axis="index")

# %% [markdown]
# ## The prompt
#
# Each training example is `BOS + prompt + summary + EOS` (llama-recipes' template; its
# `{eos_token}` is the literal `</s>`, which the Llama tokenizer maps to the EOS id 2).

# %%
print(repr(PROMPT_TEMPLATE + "{summary}</s>"))
ex = splits["train"][0]
ids = prompt_ids(tok, ex)
print(format_prompt(ex))
print(f"\n{len(ids)} tokens; first ids {ids[:8]}, last ids {ids[-4:]} (EOS = {tok.eos_id})")

# %% [markdown]
# ## Token lengths and packing

# %%
tsplits = tokenize_splits(tok, splits, cfg.seq_len, cfg.packing)
lengths = pd.DataFrame({"tokens": tsplits["train"].lengths})
fig = px.histogram(lengths, x="tokens", nbins=60, title="Train prompt lengths (tokens, with BOS/EOS)")
fig.update_layout(height=350, yaxis_title="prompts")
fig.show()

# %%
rows = []
for name, ts in tsplits.items():
    rows.append({"split": name, "prompts": ts.n_examples, "tokens": ts.n_tokens,
                 "mean tokens per prompt": round(ts.n_tokens / max(1, ts.n_examples), 1),
                 "chunks" if cfg.packing else "rows": len(ts.rows),
                 "tokens dropped (tail)": ts.n_tokens - len(ts.rows) * cfg.seq_len if cfg.packing else 0})
table = pd.DataFrame(rows)
is_study_setup = cfg.packing and cfg.seq_len == 2048 and tsplits["train"].n_tokens == study.TRAIN_TOKENS
if is_study_setup:
    table["study"] = [study.TRAIN_CHUNKS, study.VAL_CHUNKS, study.TEST_CHUNKS]
table.style.hide(axis="index")

# %% [markdown]
# ## Steps per epoch
#
# llama-recipes' DataLoader is sequential with `drop_last=True`: steps = chunks // batch size.

# %%
shown = cfg.batch_sizes if cfg.batch_sizes != "auto" else [1, 2, 4, 8]
steps = pd.DataFrame([{"batch size": b, "steps per epoch": tsplits["train"].steps_per_epoch(b),
                       "tokens per step": b * cfg.seq_len,
                       "study": study.STEPS_PER_EPOCH.get(b, "–") if is_study_setup else "–"} for b in shown])
steps.style.hide(axis="index")

# %%
write_json(out, "results/data.json", {
    "source": cfg.data, "tokenizer": tok.source, "seq_len": cfg.seq_len, "packing": cfg.packing,
    "train_chunks": len(tsplits["train"].rows), "val_chunks": len(tsplits["val"].rows),
    "test_chunks": len(tsplits["test"].rows), "train_tokens": tsplits["train"].n_tokens,
    "steps_per_epoch": {b: tsplits["train"].steps_per_epoch(b) for b in shown}, "matches_study": is_study_setup})
