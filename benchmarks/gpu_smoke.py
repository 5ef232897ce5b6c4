"""A 20-second check that the GPU machine can run loralab: CUDA, bitsandbytes int8/nf4, nvitop, the training loop.

    . benchmarks/gpu_env.sh && python benchmarks/gpu_smoke.py     # GPU, ~20 s
    python benchmarks/gpu_smoke.py --smoke                          # CPU: the same code path

Trains the tiny preset for 3 steps with the seed (int8), qlora (nf4) and fast recipes through
``loralab.train.run_training``, the one-process path run_all.py takes (model, step, monitor and all).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from loralab.config import RunConfig
from loralab.train import run_training


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="on the CPU (bitsandbytes' CPU kernels)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: use --smoke for the CPU check", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="loralab-gpu-smoke-"))
    for recipe in ("seed", "qlora", "fast"):
        cfg = RunConfig(recipe=recipe, batch_sizes=[2], seq_len=256, max_steps=3, device="cpu" if args.smoke else "cuda")
        r = run_training(cfg, out / recipe, progress=lambda *a: None, monitor_interval_s=0.2)
        peak = "n/a (CPU)" if r.peak_reserved_gib is None else f"{r.peak_reserved_gib:.3f} GiB"
        print(recipe, r.status, [round(x, 4) for x in r.losses], f"peak reserved {peak}", flush=True)
        if r.status != "ok":
            return 1
        df = pd.read_csv(out / recipe / "monitor.csv")
        util = df["gpu_util_pct"].max() if "gpu_util_pct" in df and len(df) else None
        print(f"  monitor samples: {len(df)}, columns: {list(df.columns)}, gpu util max: {util}")
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
