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
model = "tiny"
tokenizer = ""
data = "builtin"  # "builtin", a SAMSum folder, or a .json/.jsonl/.csv file
seq_len = 2048
packing = True
batch_sizes = [1, 4, 7, 8]
run_dir = ""

# %%
import pandas as pd
import plotly.express as px

from loralab import study
from loralab.config import RunConfig
from loralab.data import PROMPT_TEMPLATE, format_prompt, load_splits, prompt_ids, tokenize_splits
from loralab.model import resolve_model_folder, resolve_tokenizer_path
from loralab.report import banner, setup_plotly, write_json
from loralab.tokenizer import load_tokenizer

setup_plotly()
splits = load_splits(data)
tok = load_tokenizer(resolve_tokenizer_path(RunConfig(model=model, tokenizer=tokenizer or None),
                                            resolve_model_folder(model)))
print(f"data: {data}\ntokenizer: {tok}")

# %% [markdown]
# ## The dialogues

# %%
pd.DataFrame([{"split": k, "dialogues": len(v),
               "empty dialogues": sum(1 for e in v if not e["dialogue"].strip())} for k, v in splits.items()])

# %%
pd.set_option("display.max_colwidth", 200)
pd.DataFrame(splits["train"][:3])

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
tsplits = tokenize_splits(tok, splits, seq_len, packing)
lengths = pd.DataFrame({"tokens": tsplits["train"].lengths})
fig = px.histogram(lengths, x="tokens", nbins=60, title="Train prompt lengths (tokens, with BOS/EOS)")
fig.update_layout(height=350, yaxis_title="prompts")
fig.show()

# %%
rows = []
for name, ts in tsplits.items():
    rows.append({"split": name, "prompts": ts.n_examples, "tokens": ts.n_tokens,
                 "mean tokens/prompt": round(ts.n_tokens / max(1, ts.n_examples), 1),
                 "chunks" if packing else "rows": len(ts.rows),
                 "tokens dropped (tail)": ts.n_tokens - len(ts.rows) * seq_len if packing else 0})
table = pd.DataFrame(rows)
is_study_setup = packing and seq_len == 2048 and tsplits["train"].n_tokens == study.TRAIN_TOKENS
if is_study_setup:
    table["study"] = [study.TRAIN_CHUNKS, study.VAL_CHUNKS, study.TEST_CHUNKS]
table

# %% [markdown]
# ## Steps per epoch
#
# llama-recipes' DataLoader is sequential with `drop_last=True`: steps = chunks // batch size.

# %%
steps = pd.DataFrame([{"batch size": b, "steps per epoch": tsplits["train"].steps_per_epoch(b),
                       "tokens per step": b * seq_len,
                       "study": study.STEPS_PER_EPOCH.get(b) if is_study_setup else None} for b in batch_sizes])
steps

# %%
if run_dir:
    write_json(run_dir, "results/data.json", {
        "source": data, "tokenizer": tok.source, "seq_len": seq_len, "packing": packing,
        "train_chunks": len(tsplits["train"].rows), "val_chunks": len(tsplits["val"].rows),
        "test_chunks": len(tsplits["test"].rows), "train_tokens": tsplits["train"].n_tokens,
        "steps_per_epoch": {b: tsplits["train"].steps_per_epoch(b) for b in batch_sizes},
        "matches_study": is_study_setup})
