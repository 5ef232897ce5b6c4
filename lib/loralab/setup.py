"""Notebook 00's work: what this machine is, which versions run, and the model the sweep fine-tunes.

``prepare(cfg, run)`` collects the environment (Python, CUDA, package versions; the GPU and its memory, or the
CPU), gets the model's folder (a preset built once, a Meta checkpoint converted once, a Hugging Face folder as
it is; ``llama2-13b`` is built in memory by each training process) and its shape, and saves a ``SetupResult``.
"""

from __future__ import annotations

import torch

from loralab.config import RunConfig
from loralab.device import gpu_info, resolve_device, versions
from loralab.model import resolve_model_folder
from loralab.results import SetupResult
from loralab.run_folder import RunFolder
from loralab.shape import ModelShape, model_config

GIB = 2**30


def environment(cfg: RunConfig) -> dict:
    """Versions, and the GPU (name, driver, compute capability, memory, free memory, the cap) or the CPU."""
    env = versions()
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        g = gpu_info()
        env.update({"gpu": g["name"], "driver": g["driver"] or "unknown", "compute_capability": g["compute_capability"],
                    "gpu_memory_gib": round(total / GIB, 2), "gpu_free_gib": round(free / GIB, 2)})
        env["memory_cap"] = f"{cfg.gpu_memory_gib:g} GiB cap (emulated card)" if cfg.gpu_memory_gib else "whole card"
    else:
        env.update({"gpu": "none (CPU run)", "cpu": gpu_info()["name"], "cpu_threads": torch.get_num_threads(),
                    "memory_cap": "n/a (no GPU)"})
    return env


def prepare(cfg: RunConfig, run: RunFolder) -> SetupResult:
    """The environment and the model, ready for the sweep (a preset built or a Meta checkpoint converted here)."""
    env = environment(cfg)
    folder = resolve_model_folder(cfg.model)
    shape = ModelShape.of(model_config(str(folder) if folder else cfg.model))
    n_params = shape.total_params()
    model = {
        "source": cfg.model, "folder": str(folder) if folder else "– (built in memory by each process)",
        "random weights": "yes: memory, time and FLOPs are real; loss and summaries are not" if cfg.random_weights else "no",
        "layers": shape.L, "hidden": shape.H, "intermediate": shape.I, "heads": shape.nh, "kv heads": shape.nkv,
        "vocab": shape.V, "parameters": f"{n_params:,} ({n_params / 1e9:.2f} B)",
    }
    result = SetupResult(environment=env, model_folder=str(folder) if folder else None,
                         random_weights=cfg.random_weights, parameters=n_params, model=model)
    run.save(result)
    return result
