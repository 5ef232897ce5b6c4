"""Predicted vs measured peak GPU memory of a LoRA training step, per recipe and batch size.

    python benchmarks/memory_sweep.py --out benchmarks/results/            # H200: Llama-2-7B shape, ~5-7 min
    python benchmarks/memory_sweep.py --recipes fast --out /tmp/mem-fast    # H200: the fast recipe alone, ~2 min
    python benchmarks/memory_sweep.py --smoke --out /tmp/memsweep-smoke     # CPU, tiny model: code paths only

Random weights in the Llama-2-7B shape (memory does not depend on the values; int8 outlier
columns do a little, see loralab.memory.INT8_OUTLIER_COL_FRACTION_DOWN). Recipes are names in
``loralab.config.RECIPES``. The model is loaded the way loralab trains a preset
(``model.materialize_preset`` -> ``load_base_model`` -> ``add_lora``: real bitsandbytes int8/nf4 via
from_pretrained), once per group (seed and seed-sdpa share one load, switching attention;
lora-bf16-ckpt and lora-bf16 share one, switching checkpointing off).

Per (recipe, batch size), uncapped: ``--steps`` training steps of ``loralab.train.training_step``
on ``distributed.wrap_model`` (the recipe's own loss, e.g. fast's chunked cross-entropy; AdamW from
``train.optimizer_setup``) with the allocator's peaks reset first (``device.MemoryMeter``); records
the allocated and reserved peaks and the device peak (reserved + the process's memory outside the
allocator, read before the run), or out-of-memory (``device.is_oom``). Then, under ``--cap-gib``
(``device.cap_gpu_memory``), the measured largest batch: ``autobatch.find_batch_size`` from one above
the memory model's largest (``autobatch.largest_batch_that_fits``), stepping down on out-of-memory,
and up again while the start fits, until a batch fits and the next one does not.
Each group runs in its own process (``--in-process`` turns that off), as a training run would.
Writes memory_sweep.json and memory_sweep.md (command, GPU, driver, versions, date) to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from loralab import allocator as LA
from loralab import distributed as D
from loralab import memory as M
from loralab import model as LM
from loralab.autobatch import find_batch_size, largest_batch_that_fits
from loralab.config import RunConfig, get_recipe
from loralab.device import GIB, MemoryMeter, cap_gpu_memory, free_memory, gpu_info, is_oom, sync, versions
from loralab.profilers import random_batch
from loralab.shape import preset_config
from loralab.train import optimizer_setup, training_step

BAR_RECIPES = ["seed", "seed-sdpa", "qlora", "lora-bf16-ckpt", "lora-bf16"]
GROUPS = [["seed", "seed-sdpa"], ["qlora"], ["lora-bf16-ckpt", "lora-bf16"], ["fast"]]
VERSIONS = ("torch", "transformers", "peft", "bitsandbytes")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(model, opt, ctx, bs: int, seq: int, vocab: int, steps: int) -> dict:
    """One isolated measurement: ``steps`` training steps; peaks in GiB, or status 'oom'."""
    meter = MemoryMeter(ctx.device)
    free_memory(ctx.device)
    outside = None
    if meter.cuda:  # context + anything not ours
        outside = meter.read()["device_used_gib"] - meter.now()["reserved_gib"]
    meter.reset()
    row, oom = {"status": "ok"}, None
    t0 = time.perf_counter()
    try:
        batch = random_batch(vocab, bs, seq, ctx.device)
        for _ in range(steps):
            training_step(model, [batch], opt, ctx)
        sync(ctx.device)
        if meter.cuda:
            peaks = meter.read()
            row.update(allocated_gib=peaks["peak_allocated_gib"], reserved_gib=peaks["peak_reserved_gib"],
                       outside_allocator_gib=outside, device_gib=peaks["peak_reserved_gib"] + outside)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is a result
        if not is_oom(e):
            raise
        oom = str(e).splitlines()[0][:200]
    batch = None
    opt.zero_grad(set_to_none=True)
    free_memory(ctx.device)
    if oom:
        row = {"status": "oom", "error": oom}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def switch(model, base, recipe) -> None:
    """Reuse a loaded model for a variant that differs only in attention or checkpointing."""
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(recipe.attn_implementation)
    else:
        base.config._attn_implementation = recipe.attn_implementation
    if recipe.gradient_checkpointing == "none":
        base.gradient_checkpointing_disable()
    model.train()


def predicted(cfg, recipe, bs, seq) -> dict:
    bd = M.predict_peak(cfg, recipe, bs, seq)
    return {"predicted_allocated_gib": bd.allocated / GIB, "predicted_reserved_gib": bd.reserved / GIB,
            "predicted_device_gib": bd.total / GIB, "predicted_phase": bd.phase}


def variant(name: str, args):
    """The registry recipe as loralab runs it, or with its allocator replaced (--allocator: a measurement knob)."""
    r = get_recipe(name)
    return r.replace(allocator=args.allocator) if args.allocator else r


def run_config(recipe, args, device) -> RunConfig:
    return RunConfig(model=args.model, recipe=recipe, seq_len=args.seq_len, device=device.type)


def run_group(names, args, cfg, device, rows, cap_rows) -> None:
    first = variant(names[0], args)
    log(f"loading base for {names} ({first.quantization}, {first.param_dtype}) ...")
    t0 = time.perf_counter()
    base = LM.load_base_model(args.folder, first, device)
    model = LM.add_lora(base, first)
    log(f"  loaded in {time.perf_counter() - t0:.0f} s; trainable {LM.trainable_parameters(model)[0]:,}")
    for name in names:
        recipe = variant(name, args)
        if name != names[0]:
            switch(model, base, recipe)
        run = run_config(recipe, args, device)
        ctx = D.single_process_context(run)
        wrapped = D.wrap_model(model, ctx, recipe)
        attn = base.config._attn_implementation
        ckpt = LM.checkpointing_active(model)
        opt, _ = optimizer_setup(wrapped, run)
        for bs in args.batch_sizes:
            r = measure(wrapped, opt, ctx, bs, args.seq_len, cfg.vocab_size, args.steps)
            r.update({"recipe": name, "batch_size": bs, "seq_len": args.seq_len, "attn": attn, "checkpointing": ckpt,
                      "allocator": recipe.allocator, "segments": LA.segment_modes(),
                      **predicted(cfg, recipe, bs, args.seq_len)})
            if r["status"] == "ok" and "reserved_gib" in r:
                r["error_pct"] = 100 * (r["predicted_reserved_gib"] / r["reserved_gib"] - 1)
            rows.append(r)
            log(f"  {name:15s} bs {bs:3d}: {r['status']:3s} reserved {r.get('reserved_gib', float('nan')):7.2f} GiB  "
                f"predicted {r['predicted_reserved_gib']:7.2f} GiB  ({r.get('error_pct', float('nan')):+.1f} %)  {r['seconds']} s")
        if args.cap_gib:  # on CPU (smoke) nothing is capped: exercises the search only
            cap_rows.append(cap_search(wrapped, opt, ctx, cfg, recipe, name, args))
        del opt, wrapped
        free_memory(device)
    del model, base
    free_memory(device)


def run_group_in_child(names, args) -> tuple[list, list]:
    """One group in a fresh process: blocks the previous group's model left in the allocator (a bitsandbytes
    int8 model keeps some alive after ``del``) would otherwise count in this group's reserved peaks
    (benchmarks/results/memory_model_check_H200_20261130-loralab.md: qlora bs 1, 7.69 against 6.39 GiB)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process", "--out", tmp, "--model", args.model,
               "--recipes", *names, "--batch-sizes", *map(str, args.batch_sizes), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--cap-gib", str(args.cap_gib), "--cap-tries", str(args.cap_tries)]
        cmd += (["--allocator", args.allocator] if args.allocator else []) + (["--smoke"] if args.smoke else [])
        rc = subprocess.call(cmd)
        f = Path(tmp) / "memory_sweep.json"
        if not f.exists():
            raise RuntimeError(f"memory sweep of {names} exited with {rc} and wrote no result")
        data = json.loads(f.read_text())
    return data["rows"], data["cap"]


def cap_search(model, opt, ctx, cfg, recipe, name, args) -> dict:
    """Measured largest batch under the allocator cap: ``find_batch_size`` from one above the predicted largest
    (stepping down on out-of-memory), started one higher while its start fits; at most ``--cap-tries`` measurements."""
    if args.smoke:  # a cap this recipe's batch 2 just fits under, so the search stays tiny
        args.cap_gib = M.predict_peak(cfg, recipe, 2, args.seq_len).info["reserved_under_cap"] / GIB * 1.001
    p = largest_batch_that_fits(cfg, recipe, args.seq_len, args.cap_gib, allocator_cap=True)
    tried: dict[int, dict] = {}

    def predict(b: int) -> float:
        return M.predict_peak(cfg, recipe, b, args.seq_len).need(True) / GIB

    def one(b: int) -> float | None:
        if b not in tried:
            if len(tried) >= args.cap_tries:
                raise TimeoutError
            tried[b] = measure(model, opt, ctx, b, args.seq_len, cfg.vocab_size, args.steps)
            log(f"  {name:15s} cap {args.cap_gib} GiB, bs {b:3d}: {tried[b]['status']} "
                f"{tried[b].get('reserved_gib', float('nan')):.2f} GiB")
        if tried[b]["status"] == "oom":
            raise torch.OutOfMemoryError(f"batch {b}")
        return tried[b].get("reserved_gib")

    cap_gpu_memory(args.cap_gib, ctx.device)
    measured, start = None, p + 1
    try:
        while True:
            found = find_batch_size(predict, one, args.cap_gib, start=start)
            if found.chosen < start:  # it fits and the next one did not (0: not even batch 1)
                measured = found.chosen
                break
            start += 1
    except TimeoutError:  # --cap-tries measurements: not pinned down
        pass
    finally:
        cap_gpu_memory(None, ctx.device)
    return {"recipe": name, "allocator": recipe.allocator, "cap_gib": args.cap_gib, "predicted_largest": p, "measured_largest": measured,
            "match": measured == p, "tried": {str(k): v for k, v in sorted(tried.items())}}


def markdown(result: dict) -> str:
    L = [f"# Memory sweep: predicted vs measured peak ({result['model']}, random weights)", "",
         f"- command: `{result['command']}`", f"- GPU: {result['gpu']}", f"- versions: {result['versions']}",
         f"- CUDA caching allocator: the 'allocator' column, each recipe's Recipe.allocator (or --allocator), set by "
         f"loralab.allocator.configure when the model loads ('caching': PyTorch's default; 'expandable': "
         f"expandable_segments:True); PYTORCH_CUDA_ALLOC_CONF in the environment: {result.get('allocator_conf', 'default')}",
         f"- date: {result['date']}", f"- seq_len {result['seq_len']}, steps per measurement {result['steps']}",
         f"- constants: {result['constants']}", "",
         "| recipe | allocator | bs | status | allocated GiB | reserved GiB | device GiB | predicted reserved GiB | error % | peak at |",
         "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in result["rows"]:
        L.append(f"| {r['recipe']} | {r.get('allocator', 'caching')} | {r['batch_size']} | {r['status']} | {f(r.get('allocated_gib'))} | {f(r.get('reserved_gib'))} | "
                 f"{f(r.get('device_gib'))} | {r['predicted_reserved_gib']:.2f} | {f(r.get('error_pct'))} | {r['predicted_phase']} |")
    if result["cap"]:
        L += ["", f"Largest batch under an allocator cap of {result['cap'][0]['cap_gib']} GiB:", "",
              "| recipe | predicted | measured | match |", "| --- | ---: | ---: | --- |"]
        L += [f"| {c['recipe']} | {c['predicted_largest']} | {c['measured_largest']} | {c['match']} |" for c in result["cap"]]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--model", default="llama2-7b", help="preset name")
    ap.add_argument("--recipes", nargs="+", default=BAR_RECIPES)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2, help="training steps per measurement (2: AdamW states exist in the 2nd)")
    ap.add_argument("--cap-gib", type=float, default=40.0, help="allocator cap for the largest-batch check (0: skip)")
    ap.add_argument("--cap-tries", type=int, default=6)
    ap.add_argument("--allocator", choices=["caching", "expandable"], default=None,
                    help="run every recipe with this allocator instead of its own (Recipe.allocator)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seq 64, bs 1 2: exercises the code paths")
    ap.add_argument("--in-process", action="store_true",
                    help="run every group in this process (default: one child process per group)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.seq_len, args.batch_sizes, args.steps, args.cap_tries = "tiny", 64, [1, 2], 1, 2
        args.recipes = [r for r in args.recipes if r in ("seed", "qlora", "lora-bf16", "fast")]
    device = D.single_process_context(RunConfig(device="cpu" if args.smoke else "auto")).device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"memory sweep: {args.model} on {device}, recipes {args.recipes}, bs {args.batch_sizes}, seq {args.seq_len}")
    args.folder = LM.materialize_preset(args.model, progress=log)
    cfg = preset_config(args.model)
    rows, cap_rows = [], []
    t0 = time.perf_counter()

    def write() -> dict:  # after every group, so a run cut short still leaves its measurements
        result = {
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "model": args.model, "random_weights": True, "seq_len": args.seq_len, "steps": args.steps,
            "gpu": gpu_info(), "versions": versions(VERSIONS),
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "default", "date": dt.datetime.now().isoformat(timespec="seconds"),
            "constants": M.calibration_constants(),
            "rows": rows, "cap": cap_rows, "seconds": round(time.perf_counter() - t0, 1),
        }
        (out / "memory_sweep.json").write_text(json.dumps(result, indent=1))
        (out / "memory_sweep.md").write_text(markdown(result))
        return result

    result = write()
    for group in GROUPS:
        names = [n for n in group if n in args.recipes]
        if not names:
            continue
        if args.in_process:
            run_group(names, args, cfg, device, rows, cap_rows)
        else:
            r, c = run_group_in_child(names, args)
            rows += r
            cap_rows += c
        result = write()
    log(f"wrote {out / 'memory_sweep.json'} and memory_sweep.md in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
