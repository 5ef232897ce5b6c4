#!/usr/bin/env python
"""Several GPUs with torchrun: DDP scaling and loss match, FSDP for a model one GPU cannot hold, two nodes.

    . benchmarks/gpu_env.sh && python benchmarks/distributed.py --out benchmarks/results   # 2 H200, ~7 min
    python benchmarks/distributed.py --smoke --out /tmp/dist_smoke                        # CPU, gloo, tiny

Runs (every one a real ``torchrun`` through ``loralab.distributed.launch``):
  A  1 GPU,  DDP path, fast recipe, batch b per GPU          -> tokens/s (the baseline)
  D  2 GPUs, DDP, fast recipe, batch b per GPU, 50 steps     -> tokens/s (bar: >= 1.85 x A), losses
  C  1 GPU,  batch 2b (same global batch as D), 50 steps     -> losses (bar: D within 1 % of C every step)
  E  1 GPU,  Llama-2-13B shape, lora-bf16-ckpt (fast's bf16 layers, HF checkpointing), 24 GiB cap
                                                             -> out of memory (bar)
  F  2 GPUs, FSDP2, same, 24 GiB cap per GPU                 -> trains; per-GPU peak vs the memory model (bar: 5 %)
  G  2 "nodes" on one host: two torchrun launches (--nnodes 2 --node-rank 0/1, one GPU each,
     rendezvous on 127.0.0.1)                                -> trains and reports like D
Each run is one ``RunConfig`` (recipe from ``loralab.config.RECIPES``; nproc, strategy, nnodes,
node_rank, master_port) handed to ``loralab.distributed.launch``, which returns its ``TrainResult``.
Writes distributed.json, distributed.md and distributed_scaling.html (tokens/s vs GPUs) to --out
(the HTML embeds plotly, ~5 MB: it is not committed; benchmarks/results/*.html is git-ignored).
Random weights: the losses compare runs with each other; they mean nothing about a real model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from loralab import distributed as D  # noqa: E402
from loralab.config import RunConfig  # noqa: E402
from loralab.device import gpu_info, versions  # noqa: E402


BIG_RECIPE = "lora-bf16-ckpt"
"""Runs E and F (13B shape): fast's bf16 layers with HF's checkpointing on every layer (non-reentrant under FSDP,
``distributed.wrap_model``); the earlier results ran fast itself with HF's checkpointing, which the registry has
not (fast-full-ckpt checkpoints inside the compiled layers, not yet run under FSDP on a GPU)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    import torch

    env = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join([sys.executable] + sys.argv),
           **versions(("torch", "transformers", "peft")), "gpus": [], "driver": gpu_info()["driver"]}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def summarize(name: str, res, t: float) -> dict:
    """The run's ``TrainResult`` as a row (per_gpu_batch_size: the result's batch_size, per process)."""
    d = res.to_dict()
    keep = ("status", "world_size", "strategy", "grad_accum", "global_batch_size", "steps_done",
            "tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "peak_reserved_gib", "peak_allocated_gib",
            "predicted_peak_gib", "per_rank", "rank_status", "error")
    out = {"run": name, "wall_s": round(t, 1), "per_gpu_batch_size": d["batch_size"], **{k: d[k] for k in keep},
           "losses": d["losses"] or []}
    print(f"  {name}: {out['status']} in {t:.0f} s, {out['steps_done']} steps, "
          f"{(out['tokens_per_s'] or 0):,.0f} tok/s, peak reserved {out['peak_reserved_gib']} GiB/GPU", flush=True)
    return out


def run(name: str, cfg: RunConfig, out: Path, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    res = D.launch(cfg, out / name, progress=lambda *a: None, timeout_s=timeout_s)
    return summarize(name, res, time.perf_counter() - t0)


def two_nodes(cfg: RunConfig, out: Path, timeout_s: float, gpu: bool) -> dict:
    """Two torchrun launches, --nnodes 2, one process each, static rendezvous on 127.0.0.1."""
    results = {}

    def node(rank: int) -> None:
        env = {"CUDA_VISIBLE_DEVICES": str(rank)} if gpu else {}
        results[rank] = D.launch(RunConfig.from_dict({**cfg.to_dict(), "node_rank": rank}), out / f"G_node{rank}",
                                 progress=lambda *a: None, env=env, timeout_s=timeout_s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = summarize("G", results[0], time.perf_counter() - t0)
    s["node1_status"] = results[1].status
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model, few steps")
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch b of runs A and D")
    p.add_argument("--loss-steps", type=int, default=50)
    p.add_argument("--speed-steps", type=int, default=15)
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--only", default="ACDEFG", help="subset of runs, e.g. DF")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "distributed_runs"
    gpu = not a.smoke
    if a.smoke:
        base = dict(model="tiny", data="builtin", seq_len=128, device="cpu")
        a.loss_steps, a.speed_steps, timeout = min(a.loss_steps, 5), min(a.speed_steps, 4), 300
        big = dict(model="tiny", data="builtin", seq_len=128, device="cpu")
    else:
        tok = os.environ.get("LORALAB_LLAMA2_TOKENIZER", "")
        data = os.environ.get("LORALAB_SAMSUM_DIR", "builtin")
        base = dict(model="llama2-7b", tokenizer=tok, data=data, seq_len=2048, device="cuda")
        big = dict(model="llama2-13b", tokenizer=tok, data=data, seq_len=2048, device="cuda")
        timeout = 420
    b = a.batch

    def cfg(base: dict, recipe: str, batch: int, steps: int, nproc: int, strategy: str, **kw) -> RunConfig:
        return RunConfig(**base, recipe=recipe, batch_sizes=[batch], max_steps=steps, nproc=nproc, strategy=strategy,
                         master_port=free_port(), **kw)

    env = environment()
    print(f"distributed benchmark: {'smoke (CPU, gloo)' if a.smoke else env.get('gpus')}", flush=True)
    runs: dict[str, dict] = {}
    if "A" in a.only:
        runs["A"] = run("A", cfg(base, "fast", b, a.speed_steps, 1, "ddp"), work, timeout)
    if "D" in a.only:
        runs["D"] = run("D", cfg(base, "fast", b, a.loss_steps, 2, "ddp"), work, timeout)
    if "C" in a.only:
        runs["C"] = run("C", cfg(base, "fast", 2 * b, a.loss_steps, 1, "ddp"), work, timeout)
    cap = None if a.smoke else a.cap_gib
    if "E" in a.only and not a.smoke:  # an OOM cannot happen on the CPU
        runs["E"] = run("E", cfg(big, BIG_RECIPE, 1, 5, 1, "ddp", gpu_memory_gib=cap), work, timeout)
    if "F" in a.only:
        runs["F"] = run("F", cfg(big, BIG_RECIPE, 1, 8, 2, "fsdp", gpu_memory_gib=cap), work, timeout)
    if "G" in a.only:
        runs["G"] = two_nodes(cfg(base, "fast", b, 10, 1, "ddp", nnodes=2, master_addr="127.0.0.1"), work, timeout, gpu)

    checks = {}
    if "A" in runs and "D" in runs and runs["A"]["tokens_per_s"] and runs["D"]["tokens_per_s"]:
        r = runs["D"]["tokens_per_s"] / runs["A"]["tokens_per_s"]
        checks["ddp_speedup_2_vs_1"] = {"value": r, "bar": ">= 1.85", "pass": r >= 1.85}
    if "C" in runs and "D" in runs and runs["C"]["losses"] and runs["D"]["losses"]:
        n = min(len(runs["C"]["losses"]), len(runs["D"]["losses"]))
        rel = max(abs(d - c) / abs(c) for c, d in zip(runs["C"]["losses"][:n], runs["D"]["losses"][:n]))
        checks["loss_match_max_rel"] = {"value": rel, "steps": n, "bar": "<= 0.01 over 50 steps",
                                        "pass": rel <= 0.01 and n >= min(50, a.loss_steps)}
    if "E" in runs:
        checks["13b_one_gpu_oom"] = {"value": runs["E"]["status"], "bar": "oom", "pass": runs["E"]["status"] == "oom"}
    if "F" in runs:
        f = runs["F"]
        ok = f["status"] == "ok"
        chk = {"value": f["status"], "bar": "ok", "pass": ok}
        if ok and f["peak_reserved_gib"] and f["predicted_peak_gib"]:
            err = f["peak_reserved_gib"] / f["predicted_peak_gib"] - 1
            chk.update({"measured_gib": f["peak_reserved_gib"], "predicted_gib": f["predicted_peak_gib"],
                        "rel_error": err, "pass": abs(err) <= 0.05})
        checks["13b_fsdp_two_gpus"] = chk
    if "G" in runs:
        g = runs["G"]
        checks["two_nodes"] = {"value": g["status"], "world_size": g["world_size"], "bar": "ok, world size 2",
                               "pass": g["status"] == "ok" and g["world_size"] == 2}
    result = {"environment": env, "smoke": a.smoke, "per_gpu_batch": b, "runs": runs, "checks": checks}
    (out / "distributed.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "distributed.md", result)
    write_scaling_plot(out / "distributed_scaling.html", runs)
    print(f"wrote {out / 'distributed.md'}")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    return 0


def write_markdown(path: Path, r: dict) -> None:
    e = r["environment"]
    lines = [f"# Distributed training (torchrun){' - SMOKE (CPU, gloo, tiny model)' if r['smoke'] else ''}", "",
             f"Command: `{e['command']}`  ", f"Date: {e['date']}; GPUs: {', '.join(e.get('gpus') or ['none'])}; "
             f"driver {e.get('driver')}; NCCL {e.get('nccl')}; torch {e['torch']}; transformers {e['transformers']}; "
             f"peft {e['peft']}", "", "Random weights: losses compare runs with each other only.", "",
             "| run | GPUs | strategy | batch/GPU x GPUs x accum = global | status | steps | tok/s total | tok/s per GPU | "
             "step s | peak reserved per GPU (GiB) | predicted per GPU (GiB) |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, x in r["runs"].items():
        per = ", ".join(f"{p['peak_reserved_gib']:.2f}" for p in (x.get("per_rank") or []) if p.get("peak_reserved_gib") is not None) or "-"
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        lines.append(f"| {name} | {x.get('world_size') or '-'} | {x.get('strategy') or '-'} | "
                     f"{x.get('per_gpu_batch_size')} x {x.get('world_size')} x {x.get('grad_accum')} = {x.get('global_batch_size')} | "
                     f"{x['status']} | {x.get('steps_done')} | {f(x.get('tokens_per_s'), ',.0f')} | "
                     f"{f(x.get('tokens_per_s_per_gpu'), ',.0f')} | {f(x.get('step_time_s'), '.3f')} | {per} | "
                     f"{f(x.get('predicted_peak_gib'), '.2f')} |")
    lines += ["", "| check | value | bar | pass |", "| --- | --- | --- | --- |"]
    for k, v in r["checks"].items():
        val = v["value"] if not isinstance(v["value"], float) else f"{v['value']:.4g}"
        extra = f" (measured {v['measured_gib']:.2f} GiB vs predicted {v['predicted_gib']:.2f} GiB: {v['rel_error']:+.1%})" if "rel_error" in v else ""
        lines.append(f"| {k} | {val}{extra} | {v['bar']} | {'yes' if v['pass'] else 'NO'} |")
    path.write_text("\n".join(lines) + "\n")


def write_scaling_plot(path: Path, runs: dict) -> None:
    import plotly.graph_objects as go

    pts = [(x["world_size"], x["tokens_per_s"], n) for n, x in runs.items()
           if n in ("A", "D") and x.get("tokens_per_s")]
    if not pts:
        return
    fig = go.Figure(go.Bar(x=[f"{w} GPU{'s' if w > 1 else ''} (run {n})" for w, _, n in pts], y=[t for _, t, _ in pts],
                           text=[f"{t:,.0f} tok/s" for _, t, _ in pts]))
    if len(pts) == 2:
        fig.add_hline(y=pts[0][1] * pts[1][0], line_dash="dot", annotation_text="linear scaling")
    fig.update_layout(title="Throughput, same batch per GPU: 1 vs 2 GPUs (DDP, fast recipe)", yaxis_title="tok/s")
    fig.write_html(path, include_plotlyjs=True)


if __name__ == "__main__":
    sys.exit(main())
