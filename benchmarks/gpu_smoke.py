"""A 20-second check that the GPU machine can run loralab: CUDA, bitsandbytes int8/nf4, nvitop, papermill kernel."""
import json, time
import torch
from loralab.config import RunConfig
from loralab.data import load_splits, tokenize_splits
from loralab.gpu_monitor import GpuMonitor
from loralab.model import load_for_training
from loralab.train import train

assert torch.cuda.is_available(), "no CUDA"
with GpuMonitor(interval_s=0.2) as mon:
    for recipe in ("seed", "qlora", "fast"):
        cfg = RunConfig(recipe=recipe, batch_size=2, seq_len=256, max_steps=3, device="cuda")
        model, tok, info = load_for_training(cfg, progress=lambda *a: None)
        ts = tokenize_splits(tok, load_splits("builtin"), 256)
        r = train(cfg, model, ts["train"], f"/tmp/smoke_{recipe}", tok.pad_id, progress=lambda *a: None)
        print(recipe, r.status, [round(x, 4) for x in r.losses], f"peak reserved {r.peak_reserved_gib:.3f} GiB", flush=True)
        del model
df = mon.dataframe()
print("monitor samples:", len(df), "columns:", list(df.columns), "gpu util max:", df["gpu_util_pct"].max() if len(df) else None)
print("SMOKE OK")
