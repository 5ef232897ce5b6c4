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
run_dir = ""  # empty = a new folder under outputs/notebooks/ (the eval numbers go to results/eval.json there)
config = {}  # run_all.py passes the configuration of the whole run here; it wins over the values above

# %%
from IPython.display import Markdown, display

from loralab.report import notebook_config, notebook_run_dir

cfg = notebook_config(config, model=model, tokenizer=tokenizer, data=data, eval_examples=eval_examples, device=device)
out_dir = notebook_run_dir(run_dir, "05_summaries")
n_examples = cfg.eval_examples
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

# %%
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch

from loralab import adapter as adapter_lib
from loralab.config import get_recipe
from loralab.data import PROMPT_TEMPLATE, load_splits, prompt_ids
from loralab.evaluate import (
    ROUGE_KEYS,
    aggregate,
    eval_summary_dict,
    generate_summaries,
    paired_difference,
    rouge_scores,
)
from loralab.device import resolve_device
from loralab.model import load_base_model, resolve_model_folder, resolve_tokenizer_path
from loralab.report import setup_plotly, write_json
from loralab.tokenizer import load_tokenizer

setup_plotly()
pd.set_option("display.max_colwidth", None)

# %% [markdown]
# ## Model, tokenizer and test dialogues
#
# Summaries are decoded from unquantized weights: bf16 on a GPU, fp32 on the
# CPU (merging an adapter into int8/nf4 weights would re-quantize them, see
# `loralab.adapter`). The prompt is the study's, up to `Summary:\n`; the model
# writes the rest.

# %%
dev = resolve_device(cfg.device)
dtype = "bfloat16" if dev.type == "cuda" else "float32"
eval_recipe = get_recipe(f"generate-{'bf16' if dtype == 'bfloat16' else 'fp32'}")
folder = resolve_model_folder(cfg.model)
tok = load_tokenizer(resolve_tokenizer_path(cfg, folder))


def fresh_base():
    m = load_base_model(folder, eval_recipe, dev)
    m.eval()
    return m


base = fresh_base()
limit = base.config.max_position_embeddings
test = load_splits(cfg.data)["test"]
prompts_all = [prompt_ids(tok, ex, with_summary=False) for ex in test]
keep = [i for i, p in enumerate(prompts_all) if len(p) + max_new_tokens <= limit][:n_examples]
examples = [test[i] for i in keep]
prompts = [prompts_all[i] for i in keep]
refs = [ex["summary"] for ex in examples]
print(f"model: {folder} ({dtype}, {sum(p.numel() for p in base.parameters()) / 1e6:,.1f} M parameters) on {dev}")
print(f"tokenizer: {tok}")
print(f"test dialogues: {len(examples)} scored of {len(test)} "
      f"(first {n_examples} whose prompt + {max_new_tokens} new tokens fit in {limit} positions)")
print("prompt template:", repr(PROMPT_TEMPLATE))

# %% [markdown]
# ## Decoding
#
# Greedy (argmax at every step), one beam, no penalties, left-padded batches.
# Every setting is passed explicitly, so nothing comes from the checkpoint's
# own `generation_config.json` (Llama 2 chat ships sampling at temperature
# 0.6). A summary ends at EOS or at its first newline (SAMSum references are
# one paragraph).

# %%
base_res = generate_summaries(base, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
base_scores = rouge_scores(base_res.texts, refs)
print(json.dumps(base_res.settings, indent=1))

# %%
ft_res = ft_scores = peft_model = None
if adapter_dir:
    peft_model = adapter_lib.load_adapter(base, adapter_dir)  # wraps `base` in place
    ft_res = generate_summaries(peft_model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ft_scores = rouge_scores(ft_res.texts, refs)
else:
    display(Markdown("> **No adapter given** (`adapter_dir` is empty): only the base model is "
                     "evaluated. Pass the folder notebook 03 wrote (`<out>/adapter`)."))

# %% [markdown]
# ## Side by side
#
# The first test dialogues, their reference summary, and what each model wrote.

# %%
rows = {"dialogue": [ex["dialogue"] for ex in examples[:show_examples]],
        "reference": refs[:show_examples],
        "base": base_res.texts[:show_examples]}
if ft_res is not None:
    rows["fine-tuned"] = ft_res.texts[:show_examples]
side = pd.DataFrame(rows)
side.insert(0, "ROUGE-L base", [round(s["rougeL"], 3) for s in base_scores[:show_examples]])
if ft_scores is not None:
    side.insert(1, "ROUGE-L fine-tuned", [round(s["rougeL"], 3) for s in ft_scores[:show_examples]])
display(side.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"}).hide(axis="index"))

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
agg = {"base": aggregate(base_scores)}
if ft_scores is not None:
    agg["fine-tuned"] = aggregate(ft_scores)
    agg["fine-tuned minus base"] = paired_difference(base_scores, ft_scores)
table = pd.DataFrame({
    name: {k: f"{v[k]['mean']:.3f} [{v[k]['ci_low']:.3f}, {v[k]['ci_high']:.3f}]" for k in ROUGE_KEYS}
    for name, v in agg.items()})
table.index.name = f"F1 (0..1), n = {len(examples)}"
display(table)
if ft_scores is not None:
    gap = agg["fine-tuned minus base"]["rougeL"]["mean"]
    print(f"ROUGE-L gain from fine-tuning: {gap:+.3f} (F1 fraction; the built-in default's bar is +0.20)")

# %%
fig = go.Figure()
for name in [n for n in ("base", "fine-tuned") if n in agg]:
    v = agg[name]
    fig.add_bar(name=name, x=list(ROUGE_KEYS), y=[v[k]["mean"] for k in ROUGE_KEYS],
                error_y=dict(type="data", symmetric=False,
                             array=[v[k]["ci_high"] - v[k]["mean"] for k in ROUGE_KEYS],
                             arrayminus=[v[k]["mean"] - v[k]["ci_low"] for k in ROUGE_KEYS]))
fig.update_layout(title=f"ROUGE F1 on {len(examples)} test dialogues (95 % bootstrap CI)" +
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
speed = {"base": base_res.stats()}
if ft_res is not None:
    speed["fine-tuned (adapter unmerged)"] = ft_res.stats()
display(pd.DataFrame({
    name: {"generated tokens": s["n_generated_tokens"], "time (s)": round(s["seconds"], 2),
           "speed (tok/s)": round(s["tokens_per_s"], 1), "peak memory (GiB)": round(s["peak_memory_gib"], 3),
           "memory measured as": s["memory_kind"], "batch size": s["settings"]["batch_size"],
           "max new tokens": s["settings"]["max_new_tokens"]}
    for name, s in speed.items()}))

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

# %%
life = None
if peft_model is not None and check_adapter_life:
    from transformers import AutoModelForCausalLM

    probe_prompts = prompts[:4]
    width = max(len(p) for p in probe_prompts)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    probe = torch.tensor([[pad] * (width - len(p)) + p for p in probe_prompts])
    probe_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in probe_prompts])

    def logits(m):
        with torch.inference_mode():
            return m(input_ids=probe.to(dev), attention_mask=probe_mask.to(dev)).logits.float().cpu()

    ref_logits = logits(peft_model)
    # the same probe batch through both models: batch shape changes GEMM kernels, and with bf16
    # (or random weights' near-flat logits) that alone can flip a greedy token
    orig_gen = generate_summaries(peft_model, tok, probe_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    reloaded = adapter_lib.load_adapter(fresh_base(), adapter_dir)
    reload_diff = adapter_lib.compare_logits(peft_model, reloaded, probe, probe_mask)
    reload_gen = generate_summaries(reloaded, tok, probe_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    same_text = reload_gen.texts == orig_gen.texts
    del reloaded

    tmp_root = None
    if export_dir:
        out = Path(export_dir)
    else:
        tmp_root = Path(tempfile.mkdtemp(prefix="loralab-merged-"))
        out = tmp_root / "merged"
    adapter_lib.export_merged(peft_model, out, tokenizer_src=resolve_tokenizer_path(cfg, folder), inplace=True)
    del peft_model, base  # merged in place: the adapter model is gone
    peft_model = None
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).to(dev).eval()
    merged_logits = logits(plain)
    merge_diff = float((merged_logits - ref_logits).abs().max())
    # fp32: merging W + BA changes the order of the sums, so the logits move by rounding alone. Each fp32 matmul
    # of inner size K carries a relative error of about sqrt(K) x 6e-8 (unit roundoff), 1e-6 for K of a few
    # hundred; a few layers of them give 1e-6 to 1e-5 of the logits' size (measured: 1.0e-5 on the tiny model).
    # The tolerance is 1e-5 of the largest logit, at least 1e-5: a wrong merge (a missing or doubled B A) moves
    # the logits by orders of magnitude more.
    logit_scale = float(ref_logits.abs().max())
    merge_tol = max(1e-5, 1e-5 * logit_scale)
    top1 = float((merged_logits.argmax(-1) == ref_logits.argmax(-1))[probe_mask.bool()].float().mean())
    files = sorted(p.name for p in out.iterdir())
    size_gib = sum(p.stat().st_size for p in out.iterdir()) / 2**30
    del plain
    if tmp_root is not None:
        shutil.rmtree(tmp_root)
    life = {
        "reload max |logit diff|": reload_diff,
        "reload: same greedy summaries": same_text,
        "merged (exported, plain transformers) max |logit diff|": merge_diff,
        "merged top-1 agreement on probe tokens (%)": round(100 * top1, 2),
        "tolerance": (f"{merge_tol:.1e} (fp32: 1e-5 of the largest logit, {logit_scale:.1f}, at least 1e-5)"
                      if dtype == "float32" else "bf16 rounding (top-1 agreement reported)"),
        "exported folder": str(out) + ("  (temporary, deleted)" if tmp_root is not None else ""),
        "exported files": ", ".join(files),
        "exported size (GiB)": round(size_gib, 3),
    }
    display(pd.Series(life, name="adapter life").to_frame())
    if dtype == "float32":
        assert reload_diff == 0.0 and same_text, "reloaded adapter does not reproduce the trained model"
        assert merge_diff <= merge_tol, f"merged logits differ by {merge_diff:.2e} (> {merge_tol:.1e})"
elif peft_model is None:
    print("no adapter: reload / merge / export checks skipped")
else:
    print("check_adapter_life=False: reload / merge / export checks skipped")

# %% [markdown]
# ## For summary.json
#
# `summary.json["eval"]`: ROUGE means (F1 fraction 0..1) for both models, their
# 95 % intervals and the paired difference; generation speed and memory beside.

# %%
eval_summary = eval_summary_dict(base_scores, ft_scores)
eval_summary["generation"] = {name: {k: s[k] for k in ("n_generated_tokens", "seconds", "tokens_per_s",
                                                       "peak_memory_gib", "memory_kind")}
                              for name, s in speed.items()}
eval_summary["random_weights"] = cfg.random_weights
eval_summary["adapter_life"] = life
print(json.dumps(eval_summary, indent=1, default=str))
write_json(out_dir, "results/eval.json", eval_summary)
