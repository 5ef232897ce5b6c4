"""Plan before you launch: for a model shape, recipes and cards, does it fit, at what batch, how fast, at what cost.

``plan(...)`` gives one ``PlanRow`` per card x recipe (x batch size when asked): fits or not, the largest batch that
fits (or the one asked for), predicted peak device memory (``loralab.memory``, the model the sweeps check), predicted
tokens/s and epoch time (``loralab.timemodel``, calibrated on the machine at hand) and, when a price per GPU-hour is
given, the cost of an epoch. No weights are read: a preset or a ``config.json`` is enough. ``run_all.py --plan``
prints it; ``--plan --json`` prints the rows for scripts.

Memory on a whole card: PyTorch's allocator, when a cudaMalloc fails, frees its cached free segments and retries
(the same as under ``--gpu-memory-gib``), so a step fits when its reserved peak as a capped allocator keeps it plus
the CUDA context fits the card's usable memory (``MemoryBreakdown.info["reserved_under_cap"]``). The peak shown is
the device memory the step would use: the uncapped prediction when that fits, else the card's usable memory
(the allocator then runs at the limit).

``study_check()`` compares the A100-40GB plan of the study's recipe with the study's own table (Dell 2023; checks,
never inputs), and ``h200_check()`` the H200 plan with loralab's committed H200 measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from loralab.cards import Card, catalogue, default_cards, get_card
from loralab.config import ConfigError, Recipe, get_recipe
from loralab.memory import CUDA_CONTEXT_GIB, GIB, predict_peak
from loralab.timemodel import Calibration, predict_step

SAMSUM_TRAIN_TOKENS = 3_184_816
"""SAMSum train, the study's prompt, Llama 2 tokenizer, packed to 2048: 1555 chunks (DESIGN.md, checked)."""
JSON_FIELDS = ("card", "recipe", "batch_size", "fits", "peak_gib", "tokens_per_s", "epoch_s", "usd_per_epoch", "note")


@dataclass
class PlanRow:
    card: str
    recipe: str
    batch_size: int
    """The largest batch that fits (0: none), or the batch asked for."""
    fits: bool
    peak_gib: float | None
    """Predicted peak device memory (GiB) at ``batch_size`` (at batch 1 when nothing fits)."""
    capacity_gib: float
    tokens_per_s: float | None = None
    epoch_s: float | None = None
    steps_per_epoch: int | None = None
    usd_per_epoch: float | None = None
    bound: str = ""
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in JSON_FIELDS}


def parse_prices(items: Iterable[str], cards: dict[str, Card]) -> dict[str, float]:
    """``["A100-80GB=1.9", ...]`` -> {card name: USD per GPU-hour}; ConfigError (one line) on a bad item."""
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        try:
            usd = float(value)
        except ValueError:
            usd = float("nan")
        if not sep or not name or not math.isfinite(usd) or usd <= 0:
            raise ConfigError(f"--price {item!r}: expected CARD=USD_PER_GPU_HOUR with a number > 0, e.g. A100-80GB=1.9")
        out[get_card(name, cards).name] = usd
    return out


def _need_gib(bd) -> float:
    """Device memory that must fit a whole card: reserved as a capped allocator keeps it + the CUDA context."""
    return bd.info["reserved_under_cap"] / GIB + bd.gib("cuda_context")


def _fits(model_config, recipe: Recipe, b: int, seq_len: int, card: Card) -> tuple[bool, float]:
    bd = predict_peak(model_config, recipe, b, seq_len)
    ok = _need_gib(bd) <= card.capacity_gib
    peak = bd.total / GIB
    return ok, (peak if peak <= card.capacity_gib else card.capacity_gib) if ok else peak


def largest_batch(model_config, recipe: Recipe, seq_len: int, card: Card, max_batch: int = 1024) -> int:
    """Largest batch whose predicted need fits ``card`` (0: none); memory grows with the batch, so bisect."""
    if not _fits(model_config, recipe, 1, seq_len, card)[0]:
        return 0
    lo, hi = 1, 2
    while hi <= max_batch and _fits(model_config, recipe, hi, seq_len, card)[0]:
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(model_config, recipe, mid, seq_len, card)[0] else (lo, mid)
    return lo


def plan(model_config, recipes: list[Recipe], cards: list[Card], *, seq_len: int, tokens: int,
         batch_sizes: list[int] | None = None, prices: dict[str, float] | None = None,
         calibration: Calibration | None = None) -> list[PlanRow]:
    """One row per card x recipe (x batch size when ``batch_sizes`` is given; default: the largest that fits, at most
    the data's chunk count)."""
    cal = calibration or Calibration.load()
    prices = prices or {}
    chunks = tokens // seq_len
    if chunks < 1:
        raise ConfigError(f"tokens={tokens}: fewer than one {seq_len}-token chunk; expected the data's token count")
    rows = []
    for card in cards:
        for r in recipes:
            if r.fp8 != "off" and not card.fp8:
                rows.append(PlanRow(card.name, r.name, 0, False, None, card.capacity_gib,
                                    note=f"needs FP8 tensor cores (compute capability 8.9+; {card.name}: "
                                         f"{card.compute_capability})"))
                continue
            for b in batch_sizes or [largest_batch(model_config, r, seq_len, card, max_batch=chunks)]:
                ok, peak = _fits(model_config, r, max(b, 1), seq_len, card)
                row = PlanRow(card.name, r.name, b, ok and b > 0, peak, card.capacity_gib)
                if not row.fits:
                    row.note = (f"out of memory: needs {_need_gib(predict_peak(model_config, r, max(b, 1), seq_len)):.1f} "
                                f"GiB at batch {max(b, 1)}, {card.capacity_gib:.1f} usable")
                elif b > chunks:
                    row.note = f"batch {b} > the data's {chunks} chunks: no full step"
                else:
                    st = predict_step(model_config, r, b, seq_len, card, cal)
                    row.steps_per_epoch = chunks // b  # packed chunks, last partial batch dropped (llama-recipes)
                    row.tokens_per_s = st.tokens_per_s
                    row.epoch_s = row.steps_per_epoch * st.step_s
                    row.bound = st.bound
                    if card.name in prices:
                        row.usd_per_epoch = row.epoch_s / 3600 * prices[card.name]
                rows.append(row)
    return rows


def best_per_card(rows: list[PlanRow]) -> dict[str, PlanRow]:
    """Per card, the fitting row with the cheapest epoch (when priced), else the fastest."""
    best: dict[str, PlanRow] = {}
    for r in rows:
        if r.epoch_s is None:
            continue
        key = (r.usd_per_epoch if r.usd_per_epoch is not None else r.epoch_s)
        cur = best.get(r.card)
        if cur is None or key < (cur.usd_per_epoch if cur.usd_per_epoch is not None else cur.epoch_s):
            best[r.card] = r
    return best


def check_something_fits(rows: list[PlanRow], what: str) -> None:
    if not any(r.fits for r in rows):
        need = min((r.peak_gib for r in rows if r.peak_gib), default=None)
        biggest = max(r.capacity_gib for r in rows)
        raise ConfigError(f"{what}: fits on none of the cards ({', '.join(sorted({r.card for r in rows}))}); "
                          + (f"batch 1 needs at least {need:.1f} GiB, the largest card offers {biggest:.1f} GiB usable"
                             if need else "no recipe can run on them"))


def _f(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def markdown(rows: list[PlanRow], header: str = "") -> str:
    L = [header] if header else []
    L += ["| card | recipe | batch | fits | peak GiB (usable) | tok/s | steps/epoch | epoch | $/epoch | note |",
          "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ep = "-" if r.epoch_s is None else (f"{r.epoch_s:,.0f} s ({r.epoch_s / 3600:.2f} h)")
        L.append(f"| {r.card} | {r.recipe} | {r.batch_size if r.batch_size else '-'} | {'yes' if r.fits else 'no'} | "
                 f"{_f(r.peak_gib, '.1f')} ({r.capacity_gib:.1f}) | {_f(r.tokens_per_s, ',.0f')} | "
                 f"{_f(r.steps_per_epoch, ',')} | {ep} | {_f(r.usd_per_epoch, ',.2f')} | {r.note} |")
    best = best_per_card(rows)
    if best:
        L += ["", "Best choice per card (cheapest epoch when priced, else fastest):", ""]
        for card, r in best.items():
            cost = f", ${r.usd_per_epoch:,.2f}" if r.usd_per_epoch is not None else ""
            L.append(f"- **{card}**: `{r.recipe}` at batch {r.batch_size}: {r.tokens_per_s:,.0f} tok/s, "
                     f"{r.epoch_s / 3600:.2f} h per epoch{cost}")
    return "\n".join(L)


# --- checks against measurements nobody fitted ------------------------------------------------------------------
STUDY_TABLE = {  # Dell (2023), seed recipe, one A100-40GB, SAMSum packed to 2048 (DESIGN.md section 1)
    1: {"gib": 9.31, "gib_note": "computed in the study (Table 1), not measured"},
    4: {"gib": 26.21, "steps": 388, "epoch_s": 5003},
    7: {"gib": 39.31, "steps": 222, "epoch_s": 5073},
    8: {"oom": True},
}


def _err(pred, ref):
    return None if pred is None or ref is None else 100.0 * (pred / ref - 1.0)


def study_check(calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """The A100-40GB plan of ``seed`` (Llama-2-7B shape, SAMSum packed to 2048) against the study's table."""
    from loralab.shape import preset_config

    cfg = preset_config("llama2-7b")
    card = get_card("A100-40GB")
    rows = plan(cfg, [get_recipe("seed")], [card], seq_len=2048, tokens=SAMSUM_TRAIN_TOKENS,
                batch_sizes=sorted(STUDY_TABLE), calibration=calibration)
    out = []
    for r in rows:
        ref = STUDY_TABLE[r.batch_size]
        out.append({"batch_size": r.batch_size, "fits": r.fits, "study_fits": not ref.get("oom", False),
                    "peak_gib": r.peak_gib if r.fits else None, "study_gib": ref.get("gib"),
                    "mem_err_pct": _err(r.peak_gib, ref.get("gib")) if r.fits else None,
                    "steps": r.steps_per_epoch, "study_steps": ref.get("steps"),
                    "epoch_s": r.epoch_s, "study_epoch_s": ref.get("epoch_s"),
                    "time_err_pct": _err(r.epoch_s, ref.get("epoch_s")), "note": ref.get("gib_note", r.note)})
    return out


H200_MEASURED = [  # committed H200 measurements (Llama-2-7B shape, random weights, 2048-token packed SAMSum)
    {"recipe": "seed", "batch_size": 4, "tokens_per_s": 1489.80, "peak_gib": 25.41, "cap_gib": 40,
     "source": "seed_sweep_summary_H200_20261130.json (device used GiB, 40 GiB cap)"},
    {"recipe": "seed", "batch_size": 7, "tokens_per_s": 1547.0, "peak_gib": 38.45, "cap_gib": 40,
     "source": "seed_sweep_seed_eager_NVIDIA-H200_20261130.md"},
    {"recipe": "fast", "batch_size": 3, "tokens_per_s": 19564, "peak_gib": None, "cap_gib": 40,
     "source": "compare_H200_20261201-060533.md"},
    {"recipe": "fast", "batch_size": 1, "tokens_per_s": 17312, "peak_gib": None, "cap_gib": 24,
     "source": "compare_H200_20261201-060533.md"},
    {"recipe": "fast8", "batch_size": 3, "tokens_per_s": 14728, "peak_gib": None, "cap_gib": 40,
     "source": "compare_H200_20261201-060533.md"},
    {"recipe": "fast8", "batch_size": 1, "tokens_per_s": 9766, "peak_gib": None, "cap_gib": 24,
     "source": "compare_H200_20261201-060533.md"},
]


def h200_check(calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """The H200 plan's tok/s (= epoch time, same steps) against loralab's committed H200 measurements."""
    from loralab.shape import preset_config

    cfg = preset_config("llama2-7b")
    card = get_card("H200")
    cal = calibration or Calibration.load()
    out = []
    for m in H200_MEASURED:
        st = predict_step(cfg, get_recipe(m["recipe"]), m["batch_size"], 2048, card, cal)
        # same steps per epoch: plan epoch / measured epoch - 1 = measured tok/s / plan tok/s - 1
        out.append({**m, "pred_tokens_per_s": st.tokens_per_s, "bound": st.bound,
                    "epoch_err_pct": _err(m["tokens_per_s"], st.tokens_per_s)})
    return out


def checks_markdown(study: list[dict], h200: list[dict], cal: Calibration) -> str:
    L = ["# The plan against measurements nobody fitted it to", "",
         f"- time calibration: `{Path(cal.path).name}` ({cal.calibrated_on}; status: {cal.status})",
         "- model: Llama-2-7B shape; SAMSum train packed to 2048 (1555 chunks); recipe `seed` unless named", "",
         "## The study's table (Dell 2023, one A100-40GB): checks, never inputs", "",
         "| batch | plan fits | study | plan peak GiB | study GiB | error % | plan steps | study steps | plan epoch s | "
         "study epoch s | error % | note |",
         "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in study:
        L.append(f"| {r['batch_size']} | {'yes' if r['fits'] else 'OOM'} | {'fits' if r['study_fits'] else 'OOM'} | "
                 f"{_f(r['peak_gib'], '.2f')} | {_f(r['study_gib'], '.2f')} | {_f(r['mem_err_pct'], '+.1f')} | "
                 f"{_f(r['steps'], 'd')} | {_f(r['study_steps'], 'd')} | {_f(r['epoch_s'], ',.0f')} | "
                 f"{_f(r['study_epoch_s'], ',')} | {_f(r['time_err_pct'], '+.1f')} | {r['note']} |")
    L += ["", "Bars (issue): memory within 5 %, epoch time within 15 %, OOM at 8.", "",
          "## loralab's committed H200 measurements", "",
          "| recipe | batch | cap GiB | measured tok/s | plan tok/s | epoch time error % | plan bound by | source |",
          "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in h200:
        L.append(f"| {r['recipe']} | {r['batch_size']} | {r['cap_gib']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['pred_tokens_per_s']:,.0f} | {r['epoch_err_pct']:+.1f} | {r['bound']} | {r['source']} |")
    L += ["", "Epoch time error = plan epoch / measured epoch - 1 (= measured tok/s / plan tok/s - 1). Bar: 10 %.", ""]
    return "\n".join(L)


# --- the command line (run_all.py --plan) ----------------------------------------------------------------------
def data_tokens(data: str, tokenizer: str, model: str, seq_len: int) -> int:
    """Train tokens of ``data`` as loralab packs them (tokenised once, cached under LORALAB_HOME)."""
    from loralab.config import RunConfig
    from loralab.data import load_splits, tokenize_splits
    from loralab.model import load_tokenizer_for

    cfg = RunConfig(model=model, tokenizer=tokenizer, data=data, seq_len=seq_len, recipe="seed", packing=True)
    tok = load_tokenizer_for(cfg, progress=lambda *_: None)
    train = tokenize_splits(tok, {"train": load_splits(data)["train"]}, seq_len, packing=True)["train"]
    return len(train) * seq_len


def run_plan(*, model: str, recipes: list[Recipe], cards: list[str] | None, seq_len: int, tokens: int | None,
             data: str = "", tokenizer: str = "", batch_sizes: list[int] | None = None, prices: list[str] = (),
             cards_file: str = "", calibration: str = "", as_json: bool = False) -> str:
    """What ``run_all.py --plan`` prints (markdown, or JSON rows with ``as_json``)."""
    from loralab.shape import model_config

    cfg = model_config(model)
    cat = catalogue(cards_file or None)
    chosen = [get_card(c, cat) for c in (cards or default_cards())]
    price = parse_prices(prices, cat)
    cal = Calibration.load(calibration or None)
    if tokens is None:
        tokens = data_tokens(data, tokenizer, model, seq_len) if data else SAMSUM_TRAIN_TOKENS
        src = f"--data {data}" if data else "SAMSum train as the study packed it (--tokens N or --data to change)"
    else:
        src = "--tokens"
    rows = plan(cfg, recipes, chosen, seq_len=seq_len, tokens=tokens, batch_sizes=batch_sizes, prices=price,
                calibration=cal)
    if not batch_sizes:
        check_something_fits(rows, f"model {model!r}, recipe(s) {', '.join(r.name for r in recipes)}, seq {seq_len}")
    if as_json:
        return json.dumps([r.as_json() for r in rows], indent=1)
    head = (f"Plan: model {model}, seq {seq_len}, {tokens:,} tokens per epoch ({src}); LoRA r{recipes[0].lora_r} on "
            f"{','.join(recipes[0].lora_targets)}. Memory: loralab.memory; time: loralab.timemodel calibrated on "
            f"{cal.calibrated_on} ({cal.status.split(':')[0]}; {Path(cal.path).name}); other cards scaled by their "
            f"data-sheet peaks. Prices: {', '.join(f'{k} ${v}/h' for k, v in price.items()) or 'none given (--price CARD=USD_PER_HOUR)'}.\n")
    return markdown(rows, head)
