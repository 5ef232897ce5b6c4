"""``--batch-sizes auto``: the largest batch the memory model says fits, confirmed by one measured step.

Runs as its own process (``python -m loralab.autobatch CONFIG_JSON OUT_JSON``) so the model it
loads, and the CUDA context, are gone before the training notebooks measure memory.

1. predict: ``memory.predict_peak`` for batch 1, 2, ... until the predicted peak passes the card
   (or the ``--gpu-memory-gib`` cap, which limits PyTorch's reserved memory);
2. confirm: one real training step (forward, loss, backward, AdamW step) at that batch size,
   measuring ``torch.cuda.max_memory_reserved``; on out-of-memory, step down by one and retry.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from loralab import memory as M
from loralab.config import ConfigError, RunConfig

GIB = 2**30


def capacity_gib(cfg: RunConfig, device: torch.device) -> tuple[float, bool]:
    """(capacity, is_allocator_cap): the --gpu-memory-gib cap, else the whole card."""
    if cfg.gpu_memory_gib:
        return float(cfg.gpu_memory_gib), True
    return torch.cuda.get_device_properties(device).total_memory / GIB, False


def choose(cfg: RunConfig, log=print) -> dict:
    from loralab.data import batches, load_splits, tokenize_splits
    from loralab.model import load_for_training
    from loralab.train import free_memory

    if not torch.cuda.is_available() or cfg.device == "cpu":
        raise ConfigError("--batch-sizes auto: needs a CUDA GPU (it confirms the choice with a measured step); on CPU give batch sizes")
    model, tok, info = load_for_training(cfg, progress=log)
    device = next(model.parameters()).device
    cap, allocator_cap = capacity_gib(cfg, device)
    split = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)["train"]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.recipe.learning_rate)
    mcfg = model.config

    def predict(b: int) -> float:
        bd = M.predict_peak(mcfg, cfg.recipe, b, cfg.seq_len)
        return (bd.reserved if allocator_cap else bd.total) / GIB

    def one_step(b: int) -> float:
        if b > len(split.rows):
            raise ConfigError(f"--batch-sizes auto: batch {b} exceeds the {len(split.rows)} training rows")
        batch = {k: v.to(device) for k, v in next(batches(split, b, pad)).items()}
        torch.cuda.reset_peak_memory_stats(device)
        out = None
        try:
            out = model(**batch)
            loss = out.loss
            out = None
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_reserved(device) / GIB
        except BaseException:
            out = loss = None
            opt.zero_grad(set_to_none=True)
            free_memory(device)
            raise
        finally:
            free_memory(device)

    found = M.find_batch_size(predict, one_step, cap, max_batch=len(split.rows))
    result = {"chosen": found.chosen, "predicted_gib": found.predicted_gib, "measured_gib": found.measured_gib,
              "headroom_gib": found.headroom_gib, "capacity_gib": cap,
              "capacity_kind": "allocator cap (--gpu-memory-gib)" if allocator_cap else "whole card",
              "tried": [{"batch_size": b, "predicted_gib": p, "measured_gib": m, "status": "ok" if m is not None else "oom"}
                        for b, p, m in found.tried]}
    if found.chosen == 0:
        raise ConfigError(f"--batch-sizes auto: not even batch size 1 fits in {cap:.1f} GiB")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = RunConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    try:
        result = choose(cfg, log=lambda *a, **k: print(*a, file=sys.stderr, flush=True))
    except ConfigError as e:
        Path(argv[1]).write_text(json.dumps({"error": str(e)}))
        return 2
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
