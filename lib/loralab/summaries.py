"""Notebook 05's work: base vs fine-tuned summaries of held-out test dialogues, ROUGE, generation speed, and the
adapter's life after training (reloaded, merged into the base weights, exported as a plain Hugging Face model).

``run(cfg, run, adapter_dir)`` decodes from unquantized weights (bf16 on a GPU, fp32 on the CPU: merging an
adapter into int8/nf4 weights would re-quantize them), greedily, with the study's prompt up to ``Summary:\\n``;
scores both models with ROUGE (``loralab.evaluate``); runs ``check_adapter`` when asked; saves an
``EvaluationResult``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from loralab import adapter as adapter_lib
from loralab.config import RunConfig, get_recipe
from loralab.data import load_splits, prompt_ids
from loralab.device import resolve_device
from loralab.evaluate import eval_summary_dict, generate_summaries, rouge_scores
from loralab.model import load_base_model, resolve_model_folder, resolve_tokenizer_path
from loralab.results import AdapterChecks, EvaluationResult
from loralab.run_folder import RunFolder
from loralab.tokenizer import load_tokenizer

PROBE_PROMPTS = 4
"""Prompts of the probe batch the adapter checks compare logits and summaries on."""
FP32_MERGE_RTOL = 1e-5
"""fp32: merging W + BA changes the order of the sums, so the logits move by rounding alone. Each fp32 matmul of
inner size K carries a relative error of about sqrt(K) x 6e-8 (unit roundoff), 1e-6 for K of a few hundred; a few
layers of them give 1e-6 to 1e-5 of the logits' size (measured: 1.0e-5 on the tiny model). The tolerance is 1e-5
of the largest logit, at least 1e-5: a wrong merge (a missing or doubled B A) moves the logits by orders of
magnitude more."""


def merge_tolerance(logit_scale: float) -> float:
    """The largest |logit difference| a correct fp32 merge may show, for logits as large as ``logit_scale``."""
    return max(FP32_MERGE_RTOL, FP32_MERGE_RTOL * logit_scale)


def check_adapter(peft_model, fresh_base, adapter_dir: str | Path, tok, prompts: list[list[int]], device,
                  dtype: str, tokenizer_src: Path, max_new_tokens: int, batch_size: int,
                  export_dir: str | Path | None = None) -> AdapterChecks:
    """Reload, merge and export ``peft_model`` (trained adapter ``adapter_dir`` on its base), compared on a probe
    batch: the reloaded adapter (on ``fresh_base()``) must give the same logits and greedy summaries; the merged,
    exported model loaded by plain transformers the same logits within ``merge_tolerance`` (fp32). ``peft_model``
    is merged in place: it is gone afterwards. ``export_dir``: where the merged model goes (default: a temporary
    folder, deleted)."""
    from transformers import AutoModelForCausalLM  # heavy, and only this check loads a plain HF model

    probe_prompts = prompts[:PROBE_PROMPTS]
    width = max(len(p) for p in probe_prompts)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    probe = torch.tensor([[pad] * (width - len(p)) + p for p in probe_prompts])
    probe_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in probe_prompts])

    def logits(m):
        with torch.inference_mode():
            return m(input_ids=probe.to(device), attention_mask=probe_mask.to(device)).logits.float().cpu()

    ref_logits = logits(peft_model)
    # the same probe batch through both models: batch shape changes GEMM kernels, and with bf16
    # (or random weights' near-flat logits) that alone can flip a greedy token
    orig_gen = generate_summaries(peft_model, tok, probe_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    reloaded = adapter_lib.load_adapter(fresh_base(), adapter_dir)
    reload_diff = adapter_lib.compare_logits(peft_model, reloaded, probe, probe_mask)
    reload_gen = generate_summaries(reloaded, tok, probe_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    same_text = reload_gen.texts == orig_gen.texts
    del reloaded

    with tempfile.TemporaryDirectory(prefix="loralab-merged-") as tmp_root:
        out = Path(export_dir) if export_dir else Path(tmp_root) / "merged"
        adapter_lib.export_merged(peft_model, out, tokenizer_src=tokenizer_src, inplace=True)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).to(device).eval()
        merged_logits = logits(plain)
        files = sorted(p.name for p in out.iterdir())
        size_gib = sum(p.stat().st_size for p in out.iterdir()) / 2**30
        del plain
    merge_diff = float((merged_logits - ref_logits).abs().max())
    logit_scale = float(ref_logits.abs().max())
    top1 = float((merged_logits.argmax(-1) == ref_logits.argmax(-1))[probe_mask.bool()].float().mean())
    fp32 = dtype == "float32"
    tol = merge_tolerance(logit_scale) if fp32 else None
    return AdapterChecks(
        dtype=dtype, reload_max_logit_diff=reload_diff, reload_same_summaries=same_text, merge_max_logit_diff=merge_diff,
        merge_top1_agreement_pct=round(100 * top1, 2), merge_tolerance=tol,
        tolerance_note=(f"{tol:.1e} (fp32: 1e-5 of the largest logit, {logit_scale:.1f}, at least 1e-5)" if fp32
                        else "bf16 rounding (top-1 agreement reported)"),
        exported_folder=str(out) + ("" if export_dir else "  (temporary, deleted)"), exported_files=files,
        exported_size_gib=round(size_gib, 3),
        passed=(reload_diff == 0.0 and same_text and merge_diff <= tol) if fp32 else None)


def run(cfg: RunConfig, run: RunFolder, adapter_dir: str = "", max_new_tokens: int = 64, batch_size: int = 8,
        show_examples: int = 5, check_adapter_life: bool = True, export_dir: str = "") -> EvaluationResult:
    """Summaries of the first ``cfg.eval_examples`` test dialogues whose prompt and ``max_new_tokens`` fit the
    model's positions, by the base model and (``adapter_dir``) the fine-tuned one; saved as ``EvaluationResult``.
    Raises AssertionError when an fp32 adapter check fails (the saved result says which)."""
    dev = resolve_device(cfg.device)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    eval_recipe = get_recipe(f"generate-{'bf16' if dtype == 'bfloat16' else 'fp32'}")
    folder = resolve_model_folder(cfg.model)
    tok_path = resolve_tokenizer_path(cfg, folder)
    tok = load_tokenizer(tok_path)

    def fresh_base():
        m = load_base_model(folder, eval_recipe, dev)
        m.eval()
        return m

    base = fresh_base()
    limit = base.config.max_position_embeddings
    test = load_splits(cfg.data)["test"]
    prompts_all = [prompt_ids(tok, ex, with_summary=False) for ex in test]
    keep = [i for i, p in enumerate(prompts_all) if len(p) + max_new_tokens <= limit][:cfg.eval_examples]
    examples = [test[i] for i in keep]
    prompts = [prompts_all[i] for i in keep]
    refs = [ex["summary"] for ex in examples]
    n_params = sum(p.numel() for p in base.parameters())

    base_res = generate_summaries(base, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    base_scores = rouge_scores(base_res.texts, refs)
    ft_res = ft_scores = peft_model = None
    if adapter_dir:
        peft_model = adapter_lib.load_adapter(base, adapter_dir)  # wraps `base` in place
        ft_res = generate_summaries(peft_model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        ft_scores = rouge_scores(ft_res.texts, refs)

    shown = []
    for i, ex in enumerate(examples[:show_examples]):
        row = {"ROUGE-L base": round(base_scores[i]["rougeL"], 3)}
        if ft_scores is not None:
            row["ROUGE-L fine-tuned"] = round(ft_scores[i]["rougeL"], 3)
        row.update({"dialogue": ex["dialogue"], "reference": refs[i], "base": base_res.texts[i]})
        if ft_res is not None:
            row["fine-tuned"] = ft_res.texts[i]
        shown.append(row)
    speed = {"base": base_res.stats()}
    if ft_res is not None:
        speed["fine-tuned (adapter unmerged)"] = ft_res.stats()
    generation = {name: {k: s[k] for k in ("n_generated_tokens", "seconds", "tokens_per_s", "peak_memory_gib",
                                           "memory_kind")} | {"batch_size": s["settings"]["batch_size"],
                                                              "max_new_tokens": s["settings"]["max_new_tokens"]}
                  for name, s in speed.items()}

    checks, skipped = None, ""
    if peft_model is None:
        skipped = "no adapter: reload / merge / export checks skipped"
    elif not check_adapter_life:
        skipped = "check_adapter_life=False: reload / merge / export checks skipped"
    else:
        checks = check_adapter(peft_model, fresh_base, adapter_dir, tok, prompts, dev, dtype, tok_path,
                               max_new_tokens, batch_size, export_dir or None)
        del peft_model, base  # merged in place: the adapter model is gone

    result = EvaluationResult(
        **eval_summary_dict(base_scores, ft_scores), model_folder=str(folder), dtype=dtype, device=str(dev),
        parameters=n_params, tokenizer=str(tok), test_dialogues=len(test), position_limit=limit,
        max_new_tokens=max_new_tokens, adapter_dir=adapter_dir, decoding=base_res.settings, examples=shown,
        generation=generation, random_weights=cfg.random_weights, adapter_life=checks, adapter_life_skipped=skipped)
    run.save(result)
    if checks is not None and checks.failures():
        raise AssertionError("; ".join(checks.failures()))
    return result
