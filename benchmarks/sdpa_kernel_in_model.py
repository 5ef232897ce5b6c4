"""Which fused attention kernel does the fast recipe's SDPA call run, eager and under torch.compile?

    python benchmarks/sdpa_kernel_in_model.py --out benchmarks/results/    # GPU, ~2 min
    python benchmarks/sdpa_kernel_in_model.py --smoke --out /tmp/sdpa       # CPU, tiny model

A 2-layer model in the Llama-2-7B shape (random weights, ``model.build_random_model``), batch 3 x 2048
tokens, the ``fast-eager-layers`` recipe (eager mode) or ``fast`` (compiled mode: fast compiles its decoder
layers on CUDA; on a CPU, --smoke, it runs them eager too): 3 warm-up training steps, 5 timed, then one
profiled step, all ``profilers.time_steps`` (``loralab.train.training_step``); lists the profiler's attention kernels (names holding
flash / cudnn / fmha / efficient), SDPA's backend priority in the process, and, in eager mode, the
q/k/v layout HF hands SDPA and whether cuDNN accepts it (``torch.backends.cuda.can_use_cudnn_attention``).
Each mode runs in its own process (compile and Liger patches must not leak between them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

MODES = ("eager", "compiled")


def one(mode: str, smoke: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from loralab import fast as FAST
    from loralab import profilers as P
    from loralab.config import get_recipe
    from loralab.device import resolve_device
    from loralab.model import build_random_model
    from loralab.shape import preset_config

    dev = resolve_device("cpu" if smoke else "cuda")
    cfg = preset_config("tiny" if smoke else "llama2-7b")
    cfg.num_hidden_layers = 2
    rec = get_recipe("fast" if mode == "compiled" else "fast-eager-layers")
    seen: dict = {}
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        if not seen:
            seen["q_shape"], seen["q_stride"] = list(q.shape), list(q.stride())
            try:
                from torch.backends.cuda import SDPAParams, can_use_cudnn_attention
                p = SDPAParams(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                               kw.get("enable_gqa", False))
                seen["cudnn_accepts"] = bool(can_use_cudnn_attention(p, False))
            except Exception as e:  # noqa: BLE001 - diagnostic only
                seen["cudnn_accepts"] = f"could not ask: {type(e).__name__}"
        return orig(q, k, v, *a, **kw)

    if mode == "eager":
        F.scaled_dot_product_attention = spy
    model = build_random_model(cfg, rec, dev, seed=0)
    batch = P.random_batch(cfg.vocab_size, 3, 64 if smoke else 2048, dev)
    times = P.time_steps(model, batch, n_steps=5, warmup=3, recipe=rec)
    ms = sum(times) / len(times) * 1000
    act = torch.profiler.ProfilerActivity.CUDA if dev.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        P.time_steps(model, batch, n_steps=1, warmup=0, recipe=rec)
    keys = ("flash", "cudnn", "fmha", "efficient", "scaled_dot_product")
    kernels = [e.key[:120] for e in prof.key_averages() if any(s in e.key.lower() for s in keys)]
    return {"mode": mode, "recipe": rec.name, "sdpa_order": FAST.sdpa_order(), "step_ms_2_layers": ms, "attention_kernels": kernels[:6],
            "levers": model.loralab_levers, **seen}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(one(args.mode, args.smoke)), flush=True)
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode] + (["--smoke"] if args.smoke else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows.append(json.loads(line[7:]) if line else {"mode": mode, "error": (r.stderr or r.stdout)[-600:]})
        print(json.dumps(rows[-1])[:600], flush=True)
    import torch

    res = {"command": " ".join(["sdpa_kernel_in_model.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
           "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sdpa_kernel_in_model.json").write_text(json.dumps(res, indent=1))
    L = [f"# Which attention kernel the fast recipe runs ({res['gpu']}, torch {res['torch']})", "",
         f"- command: `python benchmarks/{res['command']}`; date {res['date']}",
         "- 2 decoder layers in the Llama-2-7B shape, random weights, batch 3 x 2048 tokens", "",
         "| mode | SDPA order | training step ms (2 layers) | attention kernels | cuDNN accepts HF's q/k/v |", "| --- | --- | ---: | --- | --- |"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['mode']} | error: {r['error'][-200:]!r} | | | |")
            continue
        ks = "<br>".join(k.split("(")[0] for k in r["attention_kernels"][:3])
        L.append(f"| {r['mode']} | {r['sdpa_order']} | {r['step_ms_2_layers']:.1f} | {ks} | {r.get('cudnn_accepts', '-')} |")
    (out / "sdpa_kernel_in_model.md").write_text("\n".join(L) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
