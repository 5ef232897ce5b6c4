"""SDPA's fused attention kernels side by side: forward + backward time and agreement.

    python benchmarks/attention_kernels.py --out benchmarks/results/     # GPU, ~20 s
    python benchmarks/attention_kernels.py --smoke --out /tmp/attn        # CPU: code path only (math backend)

The Llama-2-7B attention call of a training step (batch B, 32 heads, 2048 tokens, head dim 128,
bf16, causal), as ``torch.nn.functional.scaled_dot_product_attention`` runs it, with each backend
forced in turn (``torch.nn.attention.sdpa_kernel``): FlashAttention-2 (torch's first choice),
cuDNN, memory-efficient. Per backend: median forward + backward milliseconds over ``--iters``
(after warm-up), attention TFLOP/s (causal: half of 4 B nh S^2 d forward, 2.5x that backward),
and the largest |difference| of output and input gradients against the flash backend. Two memory layouts:
contiguous (batch, heads, seq, dim), and (batch, seq, heads, dim) viewed as (b, h, s, d), which is what HF's
Llama attention passes.
Writes attention_kernels.json and .md (command, GPU, versions, date) to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from loralab.device import gpu_info, resolve_device, sync, versions

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_flops(b: int, nh: int, s: int, d: int) -> float:
    """Causal attention FLOPs of forward + backward: QK^T and PV are 2*b*nh*s*s*d each (halved by the
    mask); the backward does 2.5x the forward's matmul work (dV, dP, dS->dQ, dK plus the recomputed QK^T)."""
    fwd = 4 * b * nh * s * s * d / 2
    return fwd * 3.5


def run(backend: str, q, k, v, g, iters: int, warmup: int, dev) -> dict:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    times = []
    try:
        with sdpa_kernel(BACKENDS[backend]):
            for i in range(warmup + iters):
                sync(dev)
                t0 = time.perf_counter()
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(g)  # one attention call's backward, not a training step: nothing of loralab.train to reuse
                sync(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                if i < warmup + iters - 1:
                    q.grad = k.grad = v.grad = None
    except RuntimeError as e:
        return {"backend": backend, "status": f"unavailable: {str(e).splitlines()[0][:200]}"}
    return {"backend": backend, "status": "ok", "ms": 1000 * statistics.median(times),
            "out": out.detach(), "grads": [t.grad.detach() for t in (q, k, v)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, math backend only")
    args = ap.parse_args(argv)
    dev = resolve_device("cpu" if args.smoke else "auto")
    backends = ["flash", "cudnn", "efficient"] if dev.type == "cuda" else ["math"]
    if args.smoke:
        args.batch_sizes, args.heads, args.seq_len, args.head_dim, args.iters, args.warmup = [1], 2, 64, 16, 2, 1
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for b, layout in [(b, lay) for b in args.batch_sizes for lay in ("bhsd", "bshd")]:
        torch.manual_seed(0)
        if layout == "bhsd":  # contiguous (batch, heads, seq, dim)
            q, k, v, g = (torch.randn((b, args.heads, args.seq_len, args.head_dim), device=dev, dtype=dtype) for _ in range(4))
        else:  # (batch, seq, heads, dim) in memory, viewed as (b, h, s, d): what HF's q/k/v projections hand SDPA
            q, k, v, g = (torch.randn((b, args.seq_len, args.heads, args.head_dim), device=dev, dtype=dtype).transpose(1, 2)
                          for _ in range(4))
        ref = None
        for name in backends:
            r = run(name, q, k, v, g, args.iters, args.warmup, dev)
            row = {"batch_size": b, "layout": layout, "backend": name, "status": r["status"]}
            if r["status"] == "ok":
                fl = attention_flops(b, args.heads, args.seq_len, args.head_dim)
                row.update(ms=r["ms"], tflops=fl / (r["ms"] / 1000) / 1e12)
                if ref is None:
                    ref = r
                else:
                    row["max_abs_diff_out"] = float((r["out"].float() - ref["out"].float()).abs().max())
                    row["max_abs_diff_grads"] = max(float((a.float() - c.float()).abs().max())
                                                    for a, c in zip(r["grads"], ref["grads"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for b, layout in {(r["batch_size"], r["layout"]) for r in rows}:
        base = next((r for r in rows if r["batch_size"] == b and r["layout"] == layout and r["backend"] == backends[0]
                     and r["status"] == "ok"), None)
        for r in rows:
            if r["batch_size"] == b and r["layout"] == layout and base and r["status"] == "ok":
                r["speedup_vs_" + backends[0]] = base["ms"] / r["ms"]
    ver = {**versions(("torch",)), "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None}
    res = {"command": " ".join(["attention_kernels.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "gpu": gpu_info()["name"] if dev.type == "cuda" else "cpu", "versions": ver,
           "shape": {"heads": args.heads, "seq_len": args.seq_len, "head_dim": args.head_dim, "dtype": str(dtype), "causal": True},
           "iters": args.iters, "warmup": args.warmup, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_kernels.json").write_text(json.dumps(res, indent=1))
    L = [f"# SDPA attention kernels, forward + backward ({res['gpu']})", "",
         f"- command: `python benchmarks/{res['command']}`", f"- date: {res['date']}; versions: {ver}",
         f"- shape: {res['shape']} (Llama-2-7B attention); median of {args.iters} after {args.warmup} warm-up", "",
         "| batch | layout | backend | status | fwd+bwd ms | TFLOP/s | speed-up vs flash | max abs diff out | max abs diff grads |",
         "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda v, p=3: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        L.append(f"| {r['batch_size']} | {r['layout']} | {r['backend']} | {r['status']} | {f(r.get('ms'))} | {f(r.get('tflops'), 0)} | "
                 f"{f(r.get('speedup_vs_' + backends[0]), 2)} | {f(r.get('max_abs_diff_out'), 4)} | {f(r.get('max_abs_diff_grads'), 4)} |")
    (out / "attention_kernels.md").write_text("\n".join(L) + "\n")
    print(f"wrote {out / 'attention_kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
