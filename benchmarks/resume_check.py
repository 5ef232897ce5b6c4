"""A training run interrupted with SIGTERM mid-epoch and resumed: the same per-step losses, and what checkpoints cost.

    . benchmarks/gpu_env.sh && python benchmarks/resume_check.py --out benchmarks/results/     # H200: ~5 min
    python benchmarks/resume_check.py --smoke --out /tmp/resume-smoke                           # CPU, tiny model, ~1 min

Three runs of the same job, each in its own process, through the library's one entry point
(``loralab.train.run_training``): ``fast`` on the Llama-2-7B shape (random weights), SAMSum packed at
2048 tokens (``LORALAB_SAMSUM_DIR``, ``LORALAB_LLAMA2_TOKENIZER``), batch 3 under a 40 GiB cap:

1. the reference, uninterrupted, ``--steps`` steps;
2. the same job, sent SIGTERM once ``--kill-after`` steps are logged: the loop finishes the step, writes a
   checkpoint and stops ("interrupted");
3. ``resume=True`` into the same folder: it continues from that checkpoint to the end.

Losses: steps 1..k of run 2 are an independent replicate of the reference (same data, same init, before
any interruption), so their differences measure the GPU's own run-to-run noise (bf16, cuDNN attention and
split-K GEMMs whose reduction order varies). The resumed steps must agree with the reference within that
noise (the tolerance: the largest replicate difference x 2, at least 1e-3 relative: a lost optimizer state
or a shifted data position moves the loss by far more). Checkpoint cost: the seconds each checkpoint took
(``TrainResult.checkpoints``) against the mean step time, and as a share of training time at the default
interval (``RunConfig.checkpoint_every_min``). Writes resume_check_<gpu>_<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from loralab.config import RunConfig
from loralab.device import gpu_info, versions
from loralab.results import TrainResult


def job(args) -> RunConfig:
    if args.smoke:
        return RunConfig(model="tiny", recipe="demo", batch_sizes=[2], seq_len=128, max_steps=args.steps, device="cpu",
                         checkpoint_every_min=args.checkpoint_every_min)
    return RunConfig(model="llama2-7b", tokenizer=os.environ["LORALAB_LLAMA2_TOKENIZER"],
                     data=os.environ["LORALAB_SAMSUM_DIR"], recipe="fast", batch_sizes=[3], gpu_memory_gib=40.0,
                     max_steps=args.steps, checkpoint_every_min=args.checkpoint_every_min)


def start(cfg: RunConfig, out: Path, log: Path) -> subprocess.Popen:
    """run_training(cfg, out) in a fresh process (its own CUDA context), output to ``log``."""
    cfg_file = out.parent / f"{out.name}_config.json"
    cfg.save(cfg_file)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from loralab.config import RunConfig
        from loralab.train import run_training
        run_training(RunConfig.load(Path({str(cfg_file)!r})), Path({str(out)!r}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)


def steps_logged(out: Path) -> int:
    f = out / "steps.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-after", type=int, default=20, help="send SIGTERM once this many steps are logged")
    ap.add_argument("--checkpoint-every-min", type=float, default=0.05,
                    help="checkpoint interval of the measured runs (short, so several checkpoints are timed)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.kill_after = min(args.steps, 12), min(args.kill_after, 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    name = f"resume_check_{'smoke' if args.smoke else gpu['name'].replace('NVIDIA ', '').replace(' ', '-')}_{stamp}"
    work = out / f"{name}_runs"
    work.mkdir()
    cfg = job(args)
    t0 = time.perf_counter()

    print("1/3 reference run ...", flush=True)
    rc = start(cfg, work / "reference", work / "reference.log").wait()
    ref = TrainResult.load(work / "reference")
    assert rc == 0 and ref and ref.status == "ok", f"reference run failed (exit {rc}): see {work / 'reference.log'}"

    print(f"2/3 the same run, SIGTERM after {args.kill_after} steps ...", flush=True)
    proc = start(cfg, work / "run", work / "interrupted.log")
    while steps_logged(work / "run") < args.kill_after:
        assert proc.poll() is None, f"the run ended before the signal (exit {proc.returncode}): see {work / 'interrupted.log'}"
        time.sleep(0.05)
    t_sig = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    stop_s = time.perf_counter() - t_sig
    interrupted = TrainResult.load(work / "run")
    assert interrupted and interrupted.status == "interrupted", f"expected status interrupted: {interrupted}"

    print("3/3 resume ...", flush=True)
    rc = start(dataclasses.replace(cfg, resume=True), work / "run", work / "resumed.log").wait()
    resumed = TrainResult.load(work / "run")
    assert rc == 0 and resumed and resumed.status == "ok", f"resumed run failed (exit {rc}): see {work / 'resumed.log'}"

    k = resumed.resumed_from_step
    rel = [abs(a - b) / abs(b) for a, b in zip(resumed.losses, ref.losses)]
    replicate = max(rel[:k]) if k else 0.0
    after = max(rel[k:]) if k < len(rel) else 0.0
    tol = max(2 * replicate, 1e-3)
    ck_s = [c["seconds"] for c in resumed.checkpoints]
    step_s = ref.step_time_s
    per_ckpt = sum(ck_s) / len(ck_s) if ck_s else None
    res = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "versions": versions(),
        "config": cfg.to_dict(), "random_weights": cfg.random_weights, "steps": args.steps,
        "signal_after_steps": args.kill_after, "stopped_after_signal_s": stop_s, "resumed_from_step": k,
        "losses": {"reference": ref.losses, "resumed": resumed.losses},
        "max_rel_diff_replicate_steps": replicate, "max_rel_diff_after_resume": after, "tolerance": tol,
        "pass_losses": after <= tol and len(resumed.losses) == len(ref.losses),
        "checkpoints": resumed.checkpoints, "checkpoint_s_mean": per_ckpt, "step_time_s": step_s,
        "checkpoint_vs_step_time": per_ckpt / step_s if per_ckpt and step_s else None,
        "share_at_default_interval": (per_ckpt / (RunConfig().checkpoint_every_min * 60)) if per_ckpt else None,
        "elapsed_s": time.perf_counter() - t0,
    }
    res["pass_checkpoint_cost"] = res["share_at_default_interval"] is not None and res["share_at_default_interval"] < 0.01
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    md = [f"# Resume after SIGTERM ({gpu['name']})", "",
          f"- command: `{res['command']}`",
          f"- date: {res['date']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
          f"- job: {cfg.model} ({'random weights' if cfg.random_weights else 'real weights'}), recipe {cfg.recipe.name}, "
          f"batch {cfg.batch_size}, seq {cfg.seq_len}, data {cfg.data}, cap {cfg.gpu_memory_gib} GiB, {args.steps} steps",
          f"- SIGTERM after {args.kill_after} logged steps; the loop stopped {stop_s:.1f} s later with a checkpoint at "
          f"step {k}; the resumed run continued from step {k} to {args.steps}", "",
          "| check | value | bar |", "|---|---|---|",
          f"| max relative loss difference, steps 1..{k} (replicate: no interruption yet) | {replicate:.2e} | - |",
          f"| max relative loss difference, steps {k + 1}..{args.steps} (after resume) | {after:.2e} | <= {tol:.1e} |",
          f"| checkpoint time (mean of {len(ck_s)}) | {per_ckpt:.3f} s | - |" if per_ckpt else "| checkpoint time | - | - |",
          f"| step time (reference) | {step_s:.3f} s | - |",
          f"| checkpoint share at the default interval ({RunConfig().checkpoint_every_min:g} min) | "
          f"{100 * (res['share_at_default_interval'] or 0):.3f} % | < 1 % |", "",
          f"Losses: {'pass' if res['pass_losses'] else 'FAIL'}; checkpoint cost: {'pass' if res['pass_checkpoint_cost'] else 'FAIL'}."]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if res["pass_losses"] and res["pass_checkpoint_cost"] else 1


if __name__ == "__main__":
    sys.exit(main())
