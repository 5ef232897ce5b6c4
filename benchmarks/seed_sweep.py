#!/usr/bin/env python
"""Reproduce the study's Tables 3 and 4 on a GPU: the seed recipe, Llama-2-7B shape, 40 GiB cap.

    python benchmarks/seed_sweep.py --tokenizer $LORALAB_LLAMA2_TOKENIZER --data $LORALAB_SAMSUM_DIR \\
        --batch-sizes 1 4 7 8 --gpu-memory-gib 40 --max-steps 6 [--attn sdpa] [--out benchmarks/results]
    python benchmarks/seed_sweep.py --smoke --runs /tmp/runs --out /tmp/seed-smoke    # CPU, tiny model, ~1 min

Runs ``run_all.py`` exactly as a user would (notebooks 00 01 02 03 06 by default), then writes
``seed_sweep_<attn>_<gpu>_<date>.json`` and ``.md`` under --out: the command, GPU, driver,
versions, date, and per batch size the measured memory (allocated, reserved, device used),
the memory model's prediction, throughput and epoch time beside the study's values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from loralab import study  # noqa: E402
from loralab.run_folder import RunFolder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default="")
    p.add_argument("--data", default="builtin")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--recipe", default="seed")
    p.add_argument("--attn", default="eager")
    p.add_argument("--batch-sizes", nargs="+", default=["1", "4", "7", "8"])
    p.add_argument("--gpu-memory-gib", type=float, default=40.0, help="0: no cap")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--notebooks", nargs="+", default=["00", "01", "02", "03", "06"])
    p.add_argument("--runs", default=str(REPO / "outputs"), help="where run_all writes its run folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, built-in data, 2 steps: the same code path")
    a = p.parse_args()
    device = "auto"
    if a.smoke:
        a.model, a.tokenizer, a.data, a.seq_len, a.batch_sizes = "tiny", "", "builtin", 128, ["1", "2"]
        a.gpu_memory_gib, a.max_steps, a.notebooks, device = 0, 2, ["00", "03"], "cpu"

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{a.recipe}-{a.attn}-bench"
    cmd = [sys.executable, "run_all.py", "--model", a.model, "--tokenizer", a.tokenizer, "--data", a.data,
           "--recipe", a.recipe, "--attn", a.attn, "--batch-sizes", *a.batch_sizes,
           *(["--gpu-memory-gib", str(a.gpu_memory_gib)] if a.gpu_memory_gib else []), "--max-steps", str(a.max_steps), "--seq-len", str(a.seq_len),
           "--notebooks", *a.notebooks, "--out", a.runs, "--run-id", run_id, "--device", device]
    print("+", shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO)
    run = RunFolder(Path(a.runs) / run_id)
    summary = run.read_summary()
    env = summary.get("environment") or {}

    rows = []
    for s in summary["sweep"]:
        bs = s["batch_size"]
        tr = run.training(bs)
        rows.append({**s, "predicted_device_gib": tr and tr.predicted_device_gib,
                     "steps_done": tr and tr.steps_done, "oom_memory": tr and tr.oom_memory,
                     "study_peak_gib": study.PEAK_MEMORY_GIB.get(bs, "-"),
                     "study_steps_per_epoch": study.STEPS_PER_EPOCH.get(bs),
                     "study_epoch_time_s": study.EPOCH_TIME_S.get(bs)})
    result = {"command": "python benchmarks/seed_sweep.py " + shlex.join(sys.argv[1:]),
              "run_all_command": shlex.join(cmd[1:]), "run_all_exit": rc, "date": stamp,
              "gpu": env.get("gpu"), "driver": env.get("driver"), "cuda": env.get("cuda"),
              "versions": {k: env.get(k) for k in ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate")},
              "model": a.model, "random_weights": summary.get("random_weights"), "recipe": a.recipe, "attn": a.attn,
              "gpu_memory_cap_gib": a.gpu_memory_gib, "max_steps": a.max_steps, "data": summary.get("data"),
              "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "cpu").strip("-")
    base = out / f"seed_sweep_{a.recipe}_{a.attn}_{gpu}_{stamp[:8]}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    base.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {base}.json and .md")
    return rc


def f(v, spec=".2f"):
    return "-" if v is None else (v if isinstance(v, str) else format(v, spec))


def markdown(r: dict) -> str:
    lines = [f"# {r['recipe']} recipe ({r['attn']} attention), {r['model']}"
             f"{' (random weights)' if r['random_weights'] else ''}, "
             + (f"{r['gpu_memory_cap_gib']:g} GiB cap" if r['gpu_memory_cap_gib'] else "no memory cap"),
             "", f"- command: `{r['command']}`", f"- run_all: `{r['run_all_command']}`",
             f"- GPU: {r['gpu']}, driver {r['driver']}, CUDA {r['cuda']}; date {r['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
             f"- data: {r['data']}; {r['max_steps']} steps per batch size, epoch time extrapolated from the steady steps",
             "", "| batch size | status | steps/epoch (study) | allocated GiB | reserved GiB | device used GiB | study GiB | predicted reserved GiB | error % | tok/s | epoch s (study) |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in r["rows"]:
        pred, res = x.get("predicted_peak_gib"), x.get("peak_reserved_gib")
        err = None if not (pred and res) else 100 * (pred - res) / res
        lines.append(f"| {x['batch_size']} | {x['status']} | {f(x['steps_per_epoch'], 'd')} ({f(x['study_steps_per_epoch'], 'd')}) | "
                     f"{f(x['peak_allocated_gib'])} | {f(res)} | {f(x['peak_device_used_gib'])} | "
                     f"{'OOM' if x['study_peak_gib'] is None else f(x['study_peak_gib'])} | {f(pred)} | {f(err, '+.1f')} | "
                     f"{f(x['tokens_per_s'], ',.0f')} | {f(x['epoch_time_s'], ',.0f')} ({f(x['study_epoch_time_s'], ',.0f')}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
