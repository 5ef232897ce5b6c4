#!/usr/bin/env python
"""Check the plan (loralab.plan) against measurements.

    python benchmarks/plan_check.py --study                 # CPU: the committed table (study A100 + committed H200)
    python benchmarks/plan_check.py --out benchmarks/results # GPU: Llama-3.1-8B shape (fast) + all-linear LoRA memory
    python benchmarks/plan_check.py --smoke                  # CPU, tiny model: the GPU path runs (numbers meaningless)

GPU part, each a training step (loralab.train.training_step) on random weights, 3 warm-up + 5 timed steps:
  A  Llama-3.1-8B shape (grouped-query attention, 128,256 vocab), ``fast``, batch --batch-8b, 2048 tokens:
     measured peak (device used = reserved + what lies outside the allocator) and tok/s against the plan on this card
     (bars: memory 5 %, tok/s 10 %);
  B  Llama-2-7B shape, ``fast`` with LoRA r16 on all linear layers, batches --batches-all-linear: measured reserved
     against the memory model's reserved (bar 5 %).
Writes plan_check_<GPU>_<date>.json and .md (command, GPU, versions, date, the calibration used).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from loralab import plan as P
from loralab import timemodel as TM
from loralab.cards import card_of_device, get_card
from loralab.config import get_recipe, parse_lora_targets
from loralab.memory import GIB, predict_peak
from loralab.shape import preset_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[plan_check] {msg}", flush=True)


def measure(cfg, recipe, batch: int, seq: int, dev, warmup: int, steps: int) -> dict:
    from loralab import distributed as D
    from loralab.config import RunConfig
    from loralab.device import MemoryMeter, free_memory, is_oom, sync
    from loralab.model import build_random_model
    from loralab.profilers import random_batch
    from loralab.train import optimizer_setup, training_step

    run = RunConfig(model="tiny", recipe=recipe, batch_sizes=[batch], seq_len=seq, device=dev.type)
    model = build_random_model(cfg, recipe, dev)
    ctx = D.single_process_context(run)
    module = D.wrap_model(model, ctx, recipe)
    opt, _ = optimizer_setup(model, run)
    meter = MemoryMeter(dev)
    outside = meter.read()["device_used_gib"] - meter.now()["reserved_gib"] if meter.cuda else None
    meter.reset()
    data = random_batch(cfg.vocab_size, batch, seq, dev)
    row = {"batch_size": batch, "status": "ok"}
    try:
        for _ in range(warmup):
            training_step(module, [data], opt, ctx)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            training_step(module, [data], opt, ctx)
        sync(dev)
        row["step_s"] = (time.perf_counter() - t0) / steps
        row["tokens_per_s"] = batch * seq / row["step_s"]
        if meter.cuda:
            pk = meter.read()
            row.update(reserved_gib=pk["peak_reserved_gib"], allocated_gib=pk["peak_allocated_gib"],
                       device_gib=pk["peak_reserved_gib"] + outside, outside_allocator_gib=outside)
    except Exception as e:  # noqa: BLE001 - out of memory is a result
        if not is_oom(e):
            raise
        row = {"batch_size": batch, "status": "oom", "error": str(e).splitlines()[0][:200]}
    del model, module, opt
    free_memory(dev)
    return row


def err(pred, meas):
    return None if pred is None or meas is None else 100.0 * (pred / meas - 1.0)


def gpu_checks(args) -> dict:
    from loralab.device import gpu_info, versions

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if dev.type == "cpu" and not args.smoke:
        raise SystemExit("plan_check.py: no GPU; use --smoke or --study")
    gpu = gpu_info()
    card = card_of_device(gpu["name"]) if dev.type == "cuda" else get_card("H200")
    cal = TM.Calibration.load()
    seq = 128 if args.smoke else 2048
    warm, steps = (1, 2) if args.smoke else (3, 5)
    res = {"command": "python " + " ".join(sys.argv), "date": dt.datetime.now().isoformat(timespec="seconds"),
           "gpu": gpu, "versions": versions(), "card": card.name, "calibration": cal.path, "calibration_status": cal.status,
           "smoke": args.smoke, "rows": []}
    cfg8 = preset_config("tiny" if args.smoke else "llama3.1-8b")
    fast = get_recipe("fast")
    m = measure(cfg8, fast, args.batch_8b, seq, dev, warm, steps)
    bd = predict_peak(cfg8, fast, args.batch_8b, seq, device=dev.type)
    st = TM.predict_step(cfg8, fast, args.batch_8b, seq, card, cal, device=dev.type)
    res["rows"].append({"check": "A: Llama-3.1-8B shape, fast", **m, "plan_device_gib": bd.total / GIB,
                        "plan_reserved_gib": bd.reserved / GIB, "plan_tokens_per_s": st.tokens_per_s,
                        "mem_err_pct": err(bd.total / GIB, m.get("device_gib")),
                        "tok_err_pct": err(st.tokens_per_s, m.get("tokens_per_s")),
                        "parts_ms": {k: v * 1e3 for k, v in st.parts.items()}, "host_ms": st.host_s * 1e3})
    log(f"A: {res['rows'][-1]}")
    cfg7 = preset_config("tiny" if args.smoke else "llama2-7b")
    al = fast.replace(lora_r=16, lora_targets=parse_lora_targets("all-linear"))
    for b in args.batches_all_linear:
        m = measure(cfg7, al, b, seq, dev, warm, 2)
        bd = predict_peak(cfg7, al, b, seq, device=dev.type)
        res["rows"].append({"check": "B: Llama-2-7B shape, fast, LoRA r16 all-linear", **m,
                            "plan_reserved_gib": bd.reserved / GIB, "plan_device_gib": bd.total / GIB,
                            "mem_err_pct": err(bd.reserved / GIB, m.get("reserved_gib"))})
        log(f"B bs {b}: {res['rows'][-1]}")
    return res


def f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def gpu_markdown(res: dict) -> str:
    L = [f"# The plan against an H200 measurement ({res['gpu'].get('name')})", "",
         f"- command: `{res['command']}`", f"- date: {res['date']}; versions: {res['versions']}",
         f"- card: {res['card']}; calibration: `{res['calibration']}` ({res['calibration_status']})",
         "- random weights; 2048-token rows; A: 3 warm-up + 5 timed steps; B: 3 warm-up + 2 steps" +
         (" (SMOKE: tiny model on CPU, numbers meaningless)" if res["smoke"] else ""), "",
         "| check | batch | status | measured device GiB | plan device GiB | error % | measured reserved GiB | "
         "plan reserved GiB | error % | measured tok/s | plan tok/s | error % |",
         "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        re_err = err(r.get("plan_reserved_gib"), r.get("reserved_gib"))
        L.append(f"| {r['check']} | {r['batch_size']} | {r['status']} | {f(r.get('device_gib'))} | {f(r.get('plan_device_gib'))} | "
                 f"{f(err(r.get('plan_device_gib'), r.get('device_gib')), '+.1f')} | {f(r.get('reserved_gib'))} | "
                 f"{f(r.get('plan_reserved_gib'))} | {f(re_err, '+.1f')} | {f(r.get('tokens_per_s'), ',.0f')} | "
                 f"{f(r.get('plan_tokens_per_s'), ',.0f')} | {f(r.get('tok_err_pct'), '+.1f')} |")
    L += ["", "Bars: A memory 5 %, tok/s 10 %; B reserved 5 %.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", action="store_true", help="CPU: write the study + committed-H200 check table")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model: the GPU path runs")
    p.add_argument("--out", default="", help="folder for results (default: benchmarks/results; smoke: /tmp)")
    p.add_argument("--batch-8b", type=int, default=2, help="batch of check A (default 2)")
    p.add_argument("--batches-all-linear", type=int, nargs="+", default=[1, 2], help="batches of check B")
    args = p.parse_args(argv)
    out = Path(args.out or ("/tmp" if args.smoke else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    if args.study:
        cal = TM.Calibration.load()
        study, h200 = P.study_check(cal), P.h200_check(cal)
        name = f"plan_check_study_{dt.date.today():%Y%m%d}"
        (out / f"{name}.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "calibration": cal.path,
                                                      "calibration_status": cal.status, "study": study, "h200": h200},
                                                     indent=1, default=str) + "\n")
        md = P.checks_markdown(study, h200, cal)
        (out / f"{name}.md").write_text(f"- command: `python benchmarks/plan_check.py --study`\n\n{md}")
        print(md)
        return 0
    res = gpu_checks(args)
    name = f"plan_check_{'smoke' if args.smoke else res['card'].replace(' ', '')}_{dt.datetime.now():%Y%m%d-%H%M}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(gpu_markdown(res))
    print(gpu_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
