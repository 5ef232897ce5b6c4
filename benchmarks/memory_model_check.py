"""Predicted vs measured peak memory: the CURRENT loralab.memory model against the committed H200 measurements.

    python benchmarks/memory_model_check.py            # CPU, seconds; reads benchmarks/results/*.json

Reads benchmarks/results/memory_sweep_H200_20261130.json (25 rows: 5 recipes x bs 1, 2, 4, 8, 16, uncapped,
one training step each, by benchmarks/memory_sweep.py) and seed_sweep_seed_eager_NVIDIA-H200_20261130.json
(the seed recipe through the real training loop under a 40 GiB allocator cap), recomputes every prediction
with the current model and writes memory_model_check_H200_20261130.{json,md}: per row predicted vs measured
reserved and allocated, error %, pass/fail at 5 %, and the largest batch under the 40 GiB cap.

The allocator constants were calibrated on these same measurements: that check is a consistency check.
The independent check reads the fresh sweeps measured after the calibration, with the constants unchanged:

    python benchmarks/memory_model_check.py --independent --tag fresh \
        --sweep benchmarks/results/memory_sweep_H200_20261130-0937_seed.json \
                benchmarks/results/memory_sweep_H200_20261130-0955_qlora-lora.json
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from loralab import memory as M
from loralab.autobatch import largest_batch_that_fits
from loralab.config import Recipe, get_recipe
from loralab.shape import preset_config

RES = Path(__file__).parent / "results"
SWEEP = RES / "memory_sweep_H200_20261130.json"
SEED = RES / "seed_sweep_seed_eager_NVIDIA-H200_20261130.json"
TOL_PCT = 5.0
CAP_GIB = 40.0


def measured_largest(sweep: dict, seed: dict | None) -> dict:
    """{recipe: (measured largest batch or None, what is known)} under the 40 GiB cap."""
    out = {}
    for c in sweep["cap"]:
        tried = {int(k): v["status"] for k, v in c["tried"].items()}
        ok = [b for b, s in tried.items() if s == "ok"]
        known = c["measured_largest"]
        if known is None and not ok:
            out[(c["recipe"], c.get("allocator", "caching"))] = (None, f"< {min(tried)} (bs {', '.join(map(str, sorted(tried)))} OOM)")
        else:
            out[(c["recipe"], c.get("allocator", "caching"))] = (known, f"{known} fits, {known + 1} OOM (memory_sweep cap search)")
    if seed is not None:
        st = {int(r["batch_size"]): r["status"] for r in seed["rows"]}
        fit = max(b for b, s in st.items() if s == "ok")
        if st.get(fit + 1) == "oom":
            out[("seed", "caching")] = (fit, f"{fit} fits, {fit + 1} OOM (seed_sweep: real training loop under the cap)")
    return out


CALIBRATION_NOTE = ("The allocator constants (FRAG_LOSS_FRACTION, FRAG_LAYER_FRACTION, ALLOCATOR_FIXED_GIB) and "
                    "EAGER_EXTRA_SCORE_BUFFERS_CUDA were calibrated on these same measurements: this is a consistency "
                    "check, not an independent one (see memory_model_check_H200_20261130-fresh.md for that).")
INDEPENDENT_NOTE = ("Independent check: these sweeps were measured after the constants were calibrated (on "
                    "memory_sweep_H200_20261130.json, 1 step per point) and the constants were not changed since; "
                    "2 training steps per point here.")


def parse_sweep(spec: str) -> tuple[Path, set[str] | None]:
    """``path`` or ``path:recipe,recipe`` (only those recipes' rows and cap searches from that file)."""
    path, _, names = spec.partition(":")
    return Path(path), ({n for n in names.split(",") if n} or None)


def load_sweeps(specs: list) -> dict:
    """One sweep dict from one or more memory_sweep.py results (rows and cap searches concatenated).

    Every row and cap search gets its "allocator": sweeps made before Recipe.allocator existed ran every recipe
    under PyTorch's default caching allocator (their header says so); later ones record it.
    """
    specs = [x if isinstance(x, tuple) else parse_sweep(str(x)) for x in specs]
    merged, rows, caps, cmds, dates = None, [], [], [], []
    for path, names in specs:
        sw = json.loads(path.read_text())
        merged = merged or dict(sw)
        keep = (lambda n: True) if names is None else (lambda n: n in names)  # noqa: E731
        for r in sw["rows"]:
            if keep(r["recipe"]):
                rows.append({**r, "allocator": r.get("allocator", "caching")})
        for c in sw["cap"]:
            if keep(c["recipe"]):
                alloc = c.get("allocator") or next((r.get("allocator") for r in sw["rows"] if r["recipe"] == c["recipe"]
                                                    and r.get("allocator")), "caching")
                caps.append({**c, "allocator": alloc})
        cmds.append(str(sw["command"]) + (f" [rows of {', '.join(sorted(names))}]" if names else ""))
        dates.append(str(sw["date"]))
    merged["rows"], merged["cap"] = rows, caps
    merged["command"], merged["date"] = " | ".join(cmds), " | ".join(dates)
    return merged


def as_measured(name: str, allocator: str) -> "Recipe":
    """The recipe variant with the allocator it was measured under."""
    return get_recipe(name).replace(allocator=allocator)


def as_loralab_runs(name: str, allocator: str) -> bool:
    return get_recipe(name).allocator == allocator


def check(sweep_path: Path | list[Path] = SWEEP, seed_path: Path | None = SEED, independent: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    sweep = load_sweeps(sweep_path if isinstance(sweep_path, list) else [sweep_path])
    seed = json.loads(Path(seed_path).read_text()) if seed_path and Path(seed_path).exists() else None
    cfg = preset_config(sweep["model"])
    rows = []
    for r in sweep["rows"]:
        if r["status"] != "ok":
            continue
        bd = M.predict_peak(cfg, as_measured(r["recipe"], r["allocator"]), r["batch_size"], r["seq_len"])
        pr, pa = bd.reserved / M.GIB, bd.allocated / M.GIB
        err = 100 * (pr / r["reserved_gib"] - 1)
        rows.append({"source": "memory_sweep", "recipe": r["recipe"], "allocator": r["allocator"],
                     "as_loralab_runs": as_loralab_runs(r["recipe"], r["allocator"]),
                     "batch_size": r["batch_size"], "cap_gib": None,
                     "measured_reserved_gib": r["reserved_gib"], "predicted_reserved_gib": pr, "error_pct": err,
                     "measured_allocated_gib": r["allocated_gib"], "predicted_allocated_gib": pa,
                     "allocated_error_pct": 100 * (pa / r["allocated_gib"] - 1), "pass": abs(err) <= TOL_PCT, "phase": bd.phase})
    seed_rows = []
    if seed is not None:
        for r in seed["rows"]:
            if r["status"] != "ok":
                continue
            bd = M.predict_peak(cfg, get_recipe("seed"), int(r["batch_size"]), 2048)
            pr = bd.info["reserved_under_cap"] / M.GIB
            seed_rows.append({"source": "seed_sweep (40 GiB cap)", "recipe": "seed", "batch_size": int(r["batch_size"]),
                              "measured_reserved_gib": r["peak_reserved_gib"], "predicted_reserved_gib": pr,
                              "error_pct": 100 * (pr / r["peak_reserved_gib"] - 1),
                              "measured_allocated_gib": r.get("peak_allocated_gib"), "predicted_allocated_gib": bd.allocated / M.GIB})
    known = measured_largest(sweep, seed)
    largest = []
    for (name, alloc), (meas, note) in known.items():
        p = largest_batch_that_fits(cfg, as_measured(name, alloc), sweep["seq_len"], CAP_GIB, allocator_cap=True)
        largest.append({"recipe": name, "allocator": alloc, "as_loralab_runs": as_loralab_runs(name, alloc),
                        "predicted": p, "measured": meas, "measured_note": note,
                        "match": (p == meas) if meas is not None else None})
    return {
        "note": INDEPENDENT_NOTE if independent else CALIBRATION_NOTE,
        "measurement": {k: sweep[k] for k in ("command", "gpu", "versions", "date", "seq_len", "steps", "model")},
        "seed_sweep": ({k: seed.get(k) for k in ("command", "gpu", "versions", "date")} if seed else None),
        "constants": M.calibration_constants(),
        "tolerance_pct": TOL_PCT, "rows": rows, "seed_sweep_rows": seed_rows, "largest_batch_cap_gib": CAP_GIB,
        "largest_batch": largest,
        "summary": {"rows": len(rows), "within_tol": sum(r["pass"] for r in rows),
                    "max_abs_error_pct": max(abs(r["error_pct"]) for r in rows),
                    "largest_known": sum(x["measured"] is not None for x in largest),
                    "largest_match": sum(bool(x["match"]) for x in largest),
                    "as_loralab_runs": {
                        "rows": sum(r["as_loralab_runs"] for r in rows),
                        "within_tol": sum(r["pass"] and r["as_loralab_runs"] for r in rows),
                        "largest_known": sum(x["measured"] is not None and x["as_loralab_runs"] for x in largest),
                        "largest_match": sum(bool(x["match"]) and x["as_loralab_runs"] for x in largest)}},
    }


def markdown(res: dict) -> str:
    m, s = res["measurement"], res["summary"]
    L = ["# Memory model check: predicted vs measured peak (H200, Llama-2-7B shape, random weights)", "",
         f"**{res['note']}**", "",
         f"- measurements: `{m['command']}` (benchmarks/memory_sweep.py), {m['date']}, GPU {m['gpu']}",
         f"- versions: {m['versions']}", f"- seq_len {m['seq_len']}, {m['steps']} step(s) per measurement"]
    if res["seed_sweep"]:
        L.append(f"- seed sweep: `{res['seed_sweep']['command']}`, {res['seed_sweep']['date']}")
    L += [f"- constants: {res['constants']}", "",
          f"**{s['within_tol']} / {s['rows']} rows within {res['tolerance_pct']:.0f} %** of measured reserved "
          f"(largest |error| {s['max_abs_error_pct']:.1f} %); largest batch under {res['largest_batch_cap_gib']:.0f} GiB: "
          f"{s['largest_match']} / {s['largest_known']} known values matched.", "",
          f"**As loralab runs each recipe** (Recipe.allocator: seed 'caching', as the study; the others 'expandable'): "
          f"{s['as_loralab_runs']['within_tol']} / {s['as_loralab_runs']['rows']} rows within {res['tolerance_pct']:.0f} %; "
          f"largest batch {s['as_loralab_runs']['largest_match']} / {s['as_loralab_runs']['largest_known']} matched.", "",
          "| recipe | allocator | bs | measured reserved GiB | predicted reserved GiB | error % | pass | measured allocated GiB | predicted allocated GiB | error % | peak at |",
          "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        L.append(f"| {r['recipe']} | {r.get('allocator', 'caching')} | {r['batch_size']} | {r['measured_reserved_gib']:.2f} | {r['predicted_reserved_gib']:.2f} | "
                 f"{r['error_pct']:+.1f} | {'yes' if r['pass'] else 'NO'} | {r['measured_allocated_gib']:.2f} | "
                 f"{r['predicted_allocated_gib']:.2f} | {r['allocated_error_pct']:+.1f} | {r['phase']} |")
    if res["seed_sweep_rows"]:
        L += ["", "Seed recipe through the training loop under the 40 GiB cap (prediction: reserved under a cap):", "",
              "| bs | measured reserved GiB | predicted GiB | error % |", "| ---: | ---: | ---: | ---: |"]
        L += [f"| {r['batch_size']} | {r['measured_reserved_gib']:.2f} | {r['predicted_reserved_gib']:.2f} | {r['error_pct']:+.1f} |"
              for r in res["seed_sweep_rows"]]
    L += ["", f"Largest batch under a {res['largest_batch_cap_gib']:.0f} GiB allocator cap:", "",
          "| recipe | allocator | predicted | measured | match |", "| --- | --- | ---: | --- | --- |"]
    L += [f"| {x['recipe']} | {x['allocator']} | {x['predicted']} | {x['measured_note']} | "
          f"{'-' if x['match'] is None else ('yes' if x['match'] else 'NO')} |" for x in res["largest_batch"]]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", nargs="+", default=[str(SWEEP)],
                    help="memory_sweep.py result(s); path:recipe,recipe takes only those recipes from a file")
    ap.add_argument("--note", default=None, help="what the check is (default: the calibration / independent note)")
    ap.add_argument("--seed-sweep", default=str(SEED))
    ap.add_argument("--independent", action="store_true", help="the sweeps were measured after the calibration")
    ap.add_argument("--tag", default="", help="output name suffix, e.g. fresh")
    ap.add_argument("--out", default=str(RES))
    args = ap.parse_args(argv)
    res = check(list(args.sweep), Path(args.seed_sweep), independent=args.independent)
    if args.note:
        res["note"] = args.note
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "memory_model_check_H200_20261130" + (f"-{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
