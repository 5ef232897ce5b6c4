"""fast8 against fast on SAMSum: the same training from the same seed, then the validation loss.

    . benchmarks/gpu_env.sh && python benchmarks/fp8_accuracy.py --out benchmarks/results/    # H200: ~3 min
    python benchmarks/fp8_accuracy.py --smoke --out /tmp/fp8-acc                               # CPU, tiny model, ~1 min

Each recipe trains the way ``run_all.py`` trains it: ``model.load_for_training`` (random weights in the
Llama-2-7B shape, seeded alike), ``distributed.wrap_model``, the SAMSum train split packed to ``--seq-len``
(``data.tokenize_splits``, the real Llama 2 tokenizer) and ``train.train`` for ``--steps`` steps at
``--batch-size``. Then the validation loss: every packed validation chunk, no gradient, the recipe's own loss,
weighted by target tokens. Random weights: the losses show whether FP8's rounding changes what LoRA learns,
not summary quality.

Bars: the two training-loss curves within 1 % of each other (10-step moving averages, the largest relative
difference; the raw per-step difference is reported beside it) and the validation losses within 1 %.
Writes ``fp8_accuracy_<gpu>_<stamp>.json``, ``.md`` and ``.svg`` (the two curves) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from loralab import distributed as D
from loralab.config import RunConfig
from loralab.data import batches, load_splits, tokenize_splits
from loralab.device import gpu_info, versions
from loralab.model import load_for_training
from loralab.train import train

BAR = 0.01
SMOOTH = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def validation_loss(model, split, batch_size: int, pad_id: int) -> tuple[float, int]:
    """Mean loss over every target token of the split (the recipe's loss, ``model(batch)``), and that token count."""
    total, tokens = 0.0, 0
    for batch in batches(split, batch_size, pad_id):
        n = int((batch["labels"][..., 1:] != -100).sum())
        total += float(model(batch)) * n
        tokens += n
    return total / tokens, tokens


def moving_average(xs: list[float], k: int) -> list[float]:
    return [sum(xs[i - k + 1:i + 1]) / k for i in range(k - 1, len(xs))]


def run(recipe: str, args, out_dir: Path) -> dict:
    cfg = RunConfig(model=args.model, tokenizer=args.tokenizer, data=args.data, recipe=recipe,
                    batch_sizes=[args.batch_size], seq_len=args.seq_len, max_steps=args.steps, seed=args.seed,
                    device=args.device, checkpoint_every_min=0)
    ctx = D.single_process_context(cfg)
    t0 = time.perf_counter()
    model, tok, _ = load_for_training(cfg, progress=log, device=ctx.device)
    wrapped = D.wrap_model(model, ctx, cfg.recipe)
    splits = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    result = train(cfg, wrapped, splits["train"], out_dir / recipe, pad, ctx, progress=log)
    model.eval()
    t1 = time.perf_counter()
    val, val_tokens = validation_loss(wrapped, splits["val"], args.batch_size, pad)
    log(f"{recipe}: {result.steps_done} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
        f"{result.tokens_per_s or 0:,.0f} tok/s; validation loss {val:.4f} over {val_tokens:,} tokens "
        f"({time.perf_counter() - t1:.0f} s)")
    del model, wrapped
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"recipe": recipe, "status": result.status, "steps": result.steps_done, "losses": result.losses,
            "tokens_per_s": result.tokens_per_s, "validation_loss": val, "validation_tokens": val_tokens,
            "validation_chunks": len(splits["val"].rows), "seconds": time.perf_counter() - t0}


def compare(a: dict, b: dict) -> dict:
    n = min(len(a["losses"]), len(b["losses"]))
    raw = [abs(x - y) / abs(y) for x, y in zip(a["losses"][:n], b["losses"][:n])]
    k = min(SMOOTH, n)
    sa, sb = moving_average(a["losses"][:n], k), moving_average(b["losses"][:n], k)
    smooth = [abs(x - y) / abs(y) for x, y in zip(sa, sb)]
    val = abs(a["validation_loss"] - b["validation_loss"]) / abs(b["validation_loss"])
    return {"steps": n, "smoothing_steps": k, "curve_max_rel_diff": max(smooth), "raw_step_max_rel_diff": max(raw),
            "raw_step_mean_rel_diff": sum(raw) / n, "validation_rel_diff": val, "bar": BAR,
            "pass": max(smooth) <= BAR and val <= BAR}


def svg(runs: list[dict], title: str) -> str:
    """Both training-loss curves (10-step moving average) as a small standalone SVG."""
    w, h, pad = 720, 360, 50
    curves = {r["recipe"]: moving_average(r["losses"], min(SMOOTH, len(r["losses"]))) for r in runs}
    ys = [y for c in curves.values() for y in c]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    n = max(len(c) for c in curves.values())
    X = lambda i: pad + (w - 2 * pad) * i / max(n - 1, 1)
    Y = lambda v: h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)
    colors = ["#1f77b4", "#d62728"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>', f'<text x="{pad}" y="20">{title}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{pad}" y="{h - pad + 30}">step {SMOOTH} (moving average over {SMOOTH} steps) to {n + SMOOTH - 1}</text>',
             f'<text x="5" y="{pad}">{hi:.3f}</text><text x="5" y="{h - pad}">{lo:.3f}</text>']
    for (name, c), col in zip(curves.items(), colors):
        pts = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in enumerate(c))
        parts.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{w - pad - 140}" y="{pad + 18 * (1 + list(curves).index(name))}" fill="{col}">{name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def markdown(res: dict) -> str:
    c = res["comparison"]
    L = [f"# {res['runs'][1]['recipe']} vs {res['runs'][0]['recipe']}: {res['steps']} training steps on SAMSum and the validation loss ({res['gpu']['name']})", "",
         f"- command: `{res['command']}`",
         f"- date: {res['date']}; GPU: {res['gpu']['name']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
         f"- model: {res['model']} (random weights: the losses say whether FP8 changes what LoRA learns, not quality); "
         f"data: {res['data']}; tokenizer: {res['tokenizer']}; seq {res['seq_len']}, batch {res['batch_size']}, seed {res['seed']}",
         "", "| recipe | steps | first loss | last loss | tok/s | validation loss | validation tokens | seconds |",
         "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        L.append(f"| {r['recipe']} | {r['steps']} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
                 f"{r['tokens_per_s'] or 0:,.0f} | {r['validation_loss']:.4f} | {r['validation_tokens']:,} | {r['seconds']:.0f} |")
    L += ["", f"- training-loss curves ({c['smoothing_steps']}-step moving averages): largest relative difference "
          f"{100 * c['curve_max_rel_diff']:.3f} % (bar {100 * c['bar']:.0f} %); raw per-step: largest "
          f"{100 * c['raw_step_max_rel_diff']:.3f} %, mean {100 * c['raw_step_mean_rel_diff']:.3f} %",
          f"- validation loss: relative difference {100 * c['validation_rel_diff']:.3f} % (bar {100 * c['bar']:.0f} %)",
          f"- verdict: {'pass' if c['pass'] else 'FAIL'}", "", f"Curves: `{res['svg']}`."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny preset and the built-in data, fast vs fast")
    ap.add_argument("--recipes", default="fast,fast8", help="the reference, then the recipe checked against it")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--data", default=os.environ.get("LORALAB_SAMSUM_DIR", ""))
    ap.add_argument("--tokenizer", default=os.environ.get("LORALAB_LLAMA2_TOKENIZER", ""))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    args.device = "auto"
    recipes = [r.strip() for r in args.recipes.split(",")]
    if args.smoke:  # fast8 needs FP8 tensor cores: the smoke runs the same code with fast twice
        args.model, args.data, args.tokenizer, args.steps, args.seq_len, args.device = "tiny", "builtin", "", 12, 128, "cpu"
        recipes = ["fast", "fast"]
    elif not (args.data and args.tokenizer):
        ap.error("--data and --tokenizer (or LORALAB_SAMSUM_DIR and LORALAB_LLAMA2_TOKENIZER): expected the SAMSum "
                 "folder and the Llama 2 tokenizer.model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    gname = "smoke" if args.smoke else gpu["name"].replace("NVIDIA ", "").replace(" ", "-").split("(")[0].strip("-")
    base = out / f"fp8_accuracy_{gname}_{stamp}"
    work = Path(tempfile.mkdtemp(prefix="loralab-fp8acc-"))  # training writes (steps.jsonl, adapter) stay outside the repo
    runs = [run(r, args, work / str(i)) for i, r in enumerate(recipes)]
    res = {"command": "python benchmarks/fp8_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
           "versions": versions(("torch", "transformers", "peft")), "model": args.model,
           "data": args.data, "tokenizer": args.tokenizer or "the model's own", "seq_len": args.seq_len,
           "batch_size": args.batch_size, "seed": args.seed, "steps": args.steps, "runs": runs,
           "comparison": compare(runs[1], runs[0]), "svg": base.with_suffix(".svg").name}
    base.with_suffix(".svg").write_text(svg(runs, f"training loss, {args.steps} steps: {' vs '.join(recipes)}"))
    base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    base.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0 if res["comparison"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
