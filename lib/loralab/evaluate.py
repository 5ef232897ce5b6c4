"""Summaries from a model, and how close they are to the references (ROUGE).

Two halves:

* ``generate_summaries``: batched greedy decoding of prompt token ids (the
  study's prompt up to ``Summary:\\n``), left-padded, with one explicit
  ``GenerationConfig`` (``DECODING``) so nothing comes from a model's own
  ``generation_config.json`` (Llama 2 chat ships ``do_sample=True,
  temperature=0.6, top_p=0.9``). It measures generated tokens per second and
  peak memory.
* ``rouge_scores`` / ``aggregate`` / ``paired_difference``: ROUGE-1/2/L/Lsum
  F1 per example with Google's ``rouge-score`` package (Porter stemming on),
  means with a percentile bootstrap 95 % confidence interval.

Convention: every ROUGE number here is an F1 **fraction in [0, 1]** (not x100).
The issue's bar ("fine-tuned ROUGE-L exceeds base by >= 0.20") is in these units.

ROUGE (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"):
  ROUGE-N  P = |ngrams(pred) ∩ ngrams(ref)| / |ngrams(pred)|,
           R = |ngrams(pred) ∩ ngrams(ref)| / |ngrams(ref)|   (multiset counts)
  ROUGE-L  P = LCS(pred, ref) / |pred|,  R = LCS(pred, ref) / |ref|
  F1 = 2 P R / (P + R)
ROUGE-Lsum is the summary-level LCS (union LCS of each reference sentence with
all predicted sentences); sentences are the newline-separated lines. The HF
``evaluate`` convention splits summaries into sentences with nltk's
``sent_tokenize`` first; nltk's punkt data cannot be downloaded here, so
``split_sentences`` uses a simple regex (split after ``.``, ``!`` or ``?``
followed by white space). On one-sentence summaries ROUGE-Lsum equals ROUGE-L.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from loralab.config import ConfigError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Every decoding knob, explicit. Greedy: argmax at every step, one beam, no
# penalties; the sampling knobs are set to their neutral values so that nothing
# is filled in from the model's generation_config (transformers fills only the
# values left None).
DECODING: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "min_new_tokens": 0,
    "use_cache": True,
}


# --------------------------------------------------------------------------- #
# Generation
# --------------------------------------------------------------------------- #


@dataclass
class GenerationResult:
    """Summaries from one model, with what producing them cost."""

    texts: list[str]
    """One summary per prompt, in the prompts' order (prompt stripped, cut at EOS and, by default, the first newline)."""
    raw_texts: list[str]
    """The decoded continuation up to EOS, before the newline cut."""
    generated_ids: list[list[int]] = field(repr=False)
    """Generated token ids per prompt, up to and including EOS (no padding)."""
    n_generated_tokens: int = 0
    """Sum over prompts of generated tokens (up to and including EOS)."""
    seconds: float = 0.0
    """Wall time of all generate calls (CUDA synchronised), s."""
    tokens_per_s: float = 0.0
    """n_generated_tokens / seconds, tok/s (batched: counts each sequence's tokens)."""
    peak_memory_gib: float = 0.0
    """See memory_kind for what this measures, GiB."""
    memory_kind: str = ""
    """"cuda max_memory_allocated" or "cpu process RSS peak minus RSS before (sampled every 5 ms)"."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The decoding settings used (DECODING plus max_new_tokens, batch_size, pad/eos ids, stop_at_newline)."""

    def stats(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("texts", "raw_texts", "generated_ids"):
            d.pop(k)
        return d


class _RSSPeak:
    """Peak resident set size of this process while the block runs, sampled in a thread."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_RSSPeak":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        return self.peak - self.start


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Left-pad to the longest prompt: [pad.. pad, p0 .. pn]; mask 0 on pads, 1 on tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """Generated ids up to and including the first EOS (what was really generated; the rest is padding)."""
    out = []
    for t in ids:
        out.append(int(t))
        if int(t) == eos_id:
            break
    return out


def generate_summaries(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    stop_at_newline: bool = True,
    warmup: bool = True,
) -> GenerationResult:
    """Greedy summaries for ``prompts`` (token ids ending at ``Summary:\\n``, BOS included).

    ``tokenizer``: loralab's TextTokenizer interface (``decode``, ``eos_id``,
    ``pad_id`` which may be None: then EOS pads; the attention mask hides it).
    Prompts are sorted by length so each batch pads little, and results come
    back in the caller's order. Generation stops per sequence at EOS or after
    ``max_new_tokens``; the text is the decoded continuation (prompt stripped)
    up to EOS and, with ``stop_at_newline``, up to its first newline (SAMSum
    references are one paragraph: 818 of 819 test summaries have no newline).
    ``warmup``: one untimed 2-token ``generate`` on the first batch before the timed
    ones (the first call of a 7B model runs at a quarter of the later speed:
    benchmarks/results/run_7b_fast_05_H200_20261130/README.md).
    The model is put in eval mode under ``torch.inference_mode`` and its
    training mode restored afterwards.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: expected an integer >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: expected an integer >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: expected a non-empty list of non-empty token id lists")
    eos_id = tokenizer.eos_id
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eos_id

    def gen_config(n_new: int) -> GenerationConfig:
        return GenerationConfig(**DECODING, max_new_tokens=n_new, eos_token_id=eos_id, pad_token_id=pad_id,
                                bos_token_id=tokenizer.bos_id)

    gen_cfg = gen_config(max_new_tokens)
    settings = dict(DECODING, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    eos_token_id=eos_id, pad_token_id=pad_id, padding_side="left",
                    stop_at_newline=stop_at_newline, warmup=warmup)

    device = _model_device(model)
    on_cuda = device.type == "cuda"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    generated: list[list[int]] = [[] for _ in prompts]

    was_training = model.training
    model.eval()
    rss = None
    try:
        if warmup:  # untimed: the first generate call pays for kernel selection and caches (4x slower on a GPU)
            ids, mask = _left_pad([prompts[i] for i in order[:batch_size]], pad_id, device)
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(2))
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            ctx = _Null()
        else:
            ctx = rss = _RSSPeak()
        from loralab.progress import Progress

        bar = Progress(-(-len(order) // batch_size), f"generating {len(order)} summaries", unit="batch")
        t0 = time.perf_counter()
        with ctx, torch.inference_mode(), bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = _left_pad([prompts[i] for i in idx], pad_id, device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
                new = out[:, ids.shape[1]:].tolist()  # strip the (padded) prompt
                for i, row in zip(idx, new):
                    generated[i] = cut_at_eos(row, eos_id)
                bar.update(1)
            if on_cuda:
                torch.cuda.synchronize(device)  # generate is async on CUDA: time the work, not the launch
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)

    if on_cuda:
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda max_memory_allocated"
    else:
        peak = rss.delta_bytes
        kind = "cpu process RSS peak minus RSS before (sampled every 5 ms)"

    raw = [tokenizer.decode([t for t in g if t != eos_id]) for g in generated]
    texts = [_clean(t, stop_at_newline) for t in raw]
    n_tok = sum(len(g) for g in generated)
    return GenerationResult(
        texts=texts, raw_texts=raw, generated_ids=generated, n_generated_tokens=n_tok,
        seconds=seconds, tokens_per_s=n_tok / seconds if seconds > 0 else float("nan"),
        peak_memory_gib=peak / 2**30, memory_kind=kind, settings=settings,
    )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _clean(text: str, stop_at_newline: bool) -> str:
    text = text.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0].strip()
    return text


# --------------------------------------------------------------------------- #
# ROUGE
# --------------------------------------------------------------------------- #

_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum: split after . ! ? followed by white space.

    A regex stand-in for nltk ``sent_tokenize`` (its punkt data is not
    downloadable here); it also splits after abbreviations like "Mr.".
    """
    parts = [p.strip() for p in _SENT_END.split(text.strip())]
    return "\n".join(p for p in parts if p)


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return _SCORER


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L/Lsum F1 (fractions 0..1) per example, Porter stemming on.

    ``rouge_score`` tokenizes by lower-casing and keeping [a-z0-9] runs.
    Sentences (``split_sentences``) are put on separate lines first; only
    ROUGE-Lsum looks at the lines.
    """
    if len(predictions) != len(references):
        raise ConfigError(f"predictions: {len(predictions)} items, expected as many as references ({len(references)})")
    sc = _scorer()
    out = []
    for pred, ref in zip(predictions, references):
        s = sc.score(split_sentences(ref), split_sentences(pred))  # score(target, prediction)
        out.append({k: float(s[k].fmeasure) for k in ROUGE_KEYS})
    return out


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Mean and percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13).

    Resample the n values with replacement ``n_resamples`` times (numpy
    ``default_rng(seed)``), take each resample's mean; the interval is the
    (1-confidence)/2 and (1+confidence)/2 percentiles of those means.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ConfigError("values: expected a non-empty 1-D sequence of numbers")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_resamples, v.size))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def aggregate(scores: Sequence[dict[str, float]], n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per ROUGE key: mean F1 and its 95 % bootstrap interval."""
    return {k: bootstrap_ci([s[k] for s in scores], n_resamples=n_resamples, seed=seed) for k in ROUGE_KEYS}


def paired_difference(base: Sequence[dict[str, float]], finetuned: Sequence[dict[str, float]],
                      n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Fine-tuned minus base, per example, then mean and 95 % bootstrap interval (paired: same examples)."""
    if len(base) != len(finetuned):
        raise ConfigError(f"finetuned scores: {len(finetuned)} items, expected as many as base scores ({len(base)})")
    return {k: bootstrap_ci([f[k] - b[k] for b, f in zip(base, finetuned)], n_resamples=n_resamples, seed=seed)
            for k in ROUGE_KEYS}


def eval_summary_dict(base_scores: Sequence[dict[str, float]],
                      ft_scores: Sequence[dict[str, float]] | None) -> dict[str, Any]:
    """``summary.json["eval"]``: ROUGE means (F1 fractions 0..1), their 95 % CIs, and the paired difference.

    ``{"n", "rouge_base": {key: mean}, "rouge_finetuned": {key: mean} | None,
    "ci95_base", "ci95_finetuned", "diff_finetuned_minus_base": {key: {mean, ci_low, ci_high}} | None,
    "convention"}``. ``ft_scores`` None: no adapter was evaluated.
    """
    agg_b = aggregate(base_scores)
    out: dict[str, Any] = {
        "n": len(base_scores),
        "rouge_base": {k: v["mean"] for k, v in agg_b.items()},
        "rouge_finetuned": None,
        "ci95_base": agg_b,
        "ci95_finetuned": None,
        "diff_finetuned_minus_base": None,
        "convention": "F1 fraction 0..1, rouge-score use_stemmer=True, percentile bootstrap 1000 resamples seed 0",
    }
    if ft_scores is not None:
        agg_f = aggregate(ft_scores)
        out["rouge_finetuned"] = {k: v["mean"] for k, v in agg_f.items()}
        out["ci95_finetuned"] = agg_f
        out["diff_finetuned_minus_base"] = paired_difference(base_scores, ft_scores)
    return out
