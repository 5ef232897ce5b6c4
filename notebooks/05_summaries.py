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
# # 05 · Summaries: base model vs fine-tuned, with ROUGE
#
# The study's point (its Figures 5 and 6): the base Llama 2 summarises
# dialogues poorly, the LoRA fine-tuned one well. This notebook shows the two
# side by side on held-out test dialogues and measures the difference with
# ROUGE, then follows the adapter through its life after training: saved,
# reloaded, merged into the base weights, exported as a plain Hugging Face
# model.

# %% tags=["parameters"]
model = "tiny"  # preset (tiny, llama2-7b), Hugging Face folder, or Meta checkpoint folder
tokenizer = ""  # tokenizer.model file or folder; empty = the one in the model folder
data = "builtin"  # builtin, a SAMSum folder, a .json/.jsonl/.csv/.parquet file, or a saved dataset folder
adapter_dir = ""  # the trained adapter folder (notebook 03 writes <run>/bs<N>/adapter); empty = base model only
eval_examples = 50  # test dialogues scored
show_examples = 5  # of those, shown side by side
max_new_tokens = 64  # generation length cap per summary, tokens
batch_size = 8  # prompts per generate call
device = "auto"  # auto, cpu or cuda
check_adapter_life = True  # reload / merge / export checks (needs the adapter)
export_dir = ""  # where to write the merged HF model; empty = a temporary folder, deleted after the check
run_dir = ""  # empty = a new folder under outputs/notebooks/ (the evaluation result is saved there)
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
import json

import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from loralab import summaries
from loralab.evaluate import ROUGE_KEYS
from loralab.report import notebook_config, setup_plotly
from loralab.run_folder import RunFolder

setup_plotly()
pd.set_option("display.max_colwidth", None)
cfg = notebook_config(config, model=model, tokenizer=tokenizer, data=data, eval_examples=eval_examples, device=device)
run = RunFolder.for_notebook(run_dir, "05_summaries")
if cfg.random_weights and cfg.model != "tiny":
    display(Markdown(
        "> **Random weights.** This report comes from a model with random weights "
        f"(`{cfg.model}`). Its summaries, and their ROUGE, are **meaningless**: what this "
        "notebook measures here is generation speed (tok/s) and peak memory, which do "
        "not depend on the weights' values. With real weights (any HF Llama folder) the "
        "same notebook gives the study's comparison."))
elif cfg.random_weights:
    display(Markdown(
        f"> **Note.** The `{cfg.model}` base has random weights: its summaries are noise by "
        "construction. The fine-tuned summaries show what the LoRA adapter alone learned "
        "from the training split."))

# %% [markdown]
# ## Summaries, scored
#
# One library call (`loralab.summaries.run`). Summaries are decoded from unquantized weights: bf16 on a GPU,
# fp32 on the CPU (merging an adapter into int8/nf4 weights would re-quantize them, see `loralab.adapter`).
# The prompt is the study's, up to `Summary:\n`; the model writes the rest. Decoding is greedy (argmax at every
# step), one beam, no penalties, left-padded batches. Every setting is passed explicitly, so nothing comes from
# the checkpoint's own `generation_config.json` (Llama 2 chat ships sampling at temperature 0.6). A summary
# ends at EOS or at its first newline (SAMSum references are one paragraph).

# %%
result = summaries.run(cfg, run, adapter_dir=adapter_dir, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       show_examples=show_examples, check_adapter_life=check_adapter_life, export_dir=export_dir)
print(f"model: {result.model_folder} ({result.dtype}, {result.parameters / 1e6:,.1f} M parameters) on {result.device}")
print(f"tokenizer: {result.tokenizer}")
print(f"test dialogues: {result.n} scored of {result.test_dialogues} "
      f"(first {cfg.eval_examples} whose prompt + {result.max_new_tokens} new tokens fit in {result.position_limit} positions)")
print(json.dumps(result.decoding, indent=1))
if not result.adapter_dir:
    display(Markdown("> **No adapter given** (`adapter_dir` is empty): only the base model is "
                     "evaluated. Pass the folder notebook 03 wrote (`<out>/adapter`)."))

# %% [markdown]
# ## Side by side
#
# The first test dialogues, their reference summary, and what each model wrote.

# %%
display(pd.DataFrame(result.examples).style.set_properties(
    **{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"}).hide(axis="index"))

# %% [markdown]
# ## ROUGE
#
# ROUGE-1/2/L/Lsum F1 from Google's `rouge-score` (Porter stemming on), as a
# **fraction 0..1** (not x100), averaged over the test dialogues. Brackets: 95 %
# percentile bootstrap interval over dialogues (1000 resamples, seed 0). The
# difference is paired: fine-tuned minus base on the same dialogue, then
# resampled. For ROUGE-Lsum summaries are split into sentences with a simple
# regex (nltk's punkt data is not available offline).

# %%
agg = {"base": result.ci95_base}
if result.ci95_finetuned is not None:
    agg["fine-tuned"] = result.ci95_finetuned
    agg["fine-tuned minus base"] = result.diff_finetuned_minus_base
rouge = pd.DataFrame({
    name: {k: f"{v[k]['mean']:.3f} [{v[k]['ci_low']:.3f}, {v[k]['ci_high']:.3f}]" for k in ROUGE_KEYS}
    for name, v in agg.items()})
rouge.index.name = f"F1 (0..1), n = {result.n}"
display(rouge)
if result.diff_finetuned_minus_base is not None:
    gap = result.diff_finetuned_minus_base["rougeL"]["mean"]
    print(f"ROUGE-L gain from fine-tuning: {gap:+.3f} (F1 fraction; the built-in default's bar is +0.20)")

# %%
fig = go.Figure()
for name in [n for n in ("base", "fine-tuned") if n in agg]:
    v = agg[name]
    fig.add_bar(name=name, x=list(ROUGE_KEYS), y=[v[k]["mean"] for k in ROUGE_KEYS],
                error_y=dict(type="data", symmetric=False,
                             array=[v[k]["ci_high"] - v[k]["mean"] for k in ROUGE_KEYS],
                             arrayminus=[v[k]["mean"] - v[k]["ci_low"] for k in ROUGE_KEYS]))
fig.update_layout(title=f"ROUGE F1 on {result.n} test dialogues (95 % bootstrap CI)" +
                  (" · random weights: meaningless" if cfg.random_weights and cfg.model != "tiny" else ""),
                  yaxis_title="F1 (fraction)", yaxis_range=[0, 1], barmode="group", height=380)
fig.show()

# %% [markdown]
# ## Generation speed and memory
#
# Tokens per second counts every generated token of every sequence up to and
# including its EOS (padding after EOS is not counted), over the wall time of
# all `generate` calls (CUDA synchronised). Peak memory on a GPU is PyTorch's
# `max_memory_allocated` (weights + KV cache + activations); on the CPU it is
# the process's resident memory above what it held before generating, sampled
# every 5 ms (the weights were already resident, so it is mostly KV cache and
# activations).

# %%
display(pd.DataFrame({
    name: {"generated tokens": s["n_generated_tokens"], "time (s)": round(s["seconds"], 2),
           "speed (tok/s)": round(s["tokens_per_s"], 1), "peak memory (GiB)": round(s["peak_memory_gib"], 3),
           "memory measured as": s["memory_kind"], "batch size": s["batch_size"], "max new tokens": s["max_new_tokens"]}
    for name, s in result.generation.items()}))

# %% [markdown]
# ## The adapter after training
#
# 1. **Reload**: the saved adapter into a fresh copy of the base model must
#    give the same logits and the same greedy summaries.
# 2. **Merge**: W' = W + (alpha / r) B A folded into the base weights
#    (peft `merge_and_unload`): the merged model's logits must match the
#    adapter model's on a probe batch (fp32: within 1e-5 of the largest logit, at least 1e-5; bf16: rounding of
#    the merged weights shows, so the top-1 agreement is reported too).
# 3. **Export**: the merged model as a Hugging Face folder that plain
#    `transformers.AutoModelForCausalLM.from_pretrained` loads, no peft.
#
# (`loralab.summaries.check_adapter`; an fp32 check that fails fails this notebook.)

# %%
life = result.adapter_life
if life is not None:
    display(pd.Series({
        "reload max |logit diff|": life.reload_max_logit_diff,
        "reload: same greedy summaries": life.reload_same_summaries,
        "merged (exported, plain transformers) max |logit diff|": life.merge_max_logit_diff,
        "merged top-1 agreement on probe tokens (%)": life.merge_top1_agreement_pct,
        "tolerance": life.tolerance_note,
        "exported folder": life.exported_folder,
        "exported files": ", ".join(life.exported_files),
        "exported size (GiB)": life.exported_size_gib,
        "passed": {True: "yes", False: "no", None: "– (bf16: no pass/fail)"}[life.passed],
    }, name="adapter life").to_frame())
else:
    print(result.adapter_life_skipped)

# %% [markdown]
# ## For summary.json
#
# `summary.json["eval"]`: ROUGE means (F1 fraction 0..1) for both models, their
# 95 % intervals and the paired difference; generation speed and memory beside.

# %%
print(json.dumps({k: v for k, v in result.to_dict().items() if k not in ("examples", "decoding")}, indent=1, default=str))
