"""loralab's training loop: readable, one JSON line per step, out-of-memory as a result.

Phases: setup (optimizer, scheduler, seed), train (steps), finish (adapter, result).
Per step it logs step, epoch, loss, lr, tokens, tokens/s, step time and the peak
memory of that step (allocated, reserved, active; the allocator's peaks are reset
before each step), plus the device memory in use as a monitor shows it (CUDA
context included). A CUDA out-of-memory error ends the run with status "oom",
the batch size and the memory at the failure; memory is freed so the caller can
go on (the sweep tries the next batch size).

As llama-recipes (2023): AdamW(lr, weight_decay), StepLR(step_size=1, gamma)
stepped once per epoch, sequential batches with drop_last, no autocast unless
the recipe asks, loss = HF causal-LM loss over every token.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loralab.config import RunConfig
from loralab.data import TokenizedSplit, batches
from loralab.fast import forward_loss
from loralab.model import DTYPES

GIB = 2**30


def is_oom(exc: BaseException) -> bool:
    """A CUDA (or bitsandbytes) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class TrainResult:
    status: str  # "ok" | "oom"
    batch_size: int
    steps_per_epoch: int
    steps_done: int
    total_steps: int
    tokens_per_step: float
    """Tokens a step trains on: batch x seq_len when packed; the measured mean (padding excluded) otherwise."""
    final_loss: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    epoch_time_s: float | None = None
    epoch_time_kind: str | None = None
    """"measured" (a whole epoch ran) or "extrapolated from N steps"."""
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_active_gib: float | None = None
    peak_device_used_gib: float | None = None
    """Device memory in use as nvidia-smi shows it (CUDA context and other processes included)."""
    error: str | None = None
    oom_memory: dict | None = None
    adapter_dir: str | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class MemoryMeter:
    """Per-step peaks from the CUDA caching allocator (zeros on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        if not self.cuda:  # no device memory to measure on CPU: say nothing rather than 0
            return {"peak_allocated_gib": None, "peak_reserved_gib": None, "peak_active_gib": None,
                    "device_used_gib": None}
        s = torch.cuda.memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "peak_allocated_gib": s.get("allocated_bytes.all.peak", 0) / GIB,
            "peak_reserved_gib": s.get("reserved_bytes.all.peak", 0) / GIB,
            "peak_active_gib": s.get("active_bytes.all.peak", 0) / GIB,
            "device_used_gib": (total - free) / GIB,
        }

    def now(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        return {"allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
                "reserved_gib": torch.cuda.memory_reserved(self.device) / GIB,
                "max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                "max_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: step times must include the GPU's work


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def optimizer_setup(model, cfg: RunConfig, device: torch.device):
    """(AdamW, StepLR stepped once per epoch, autocast context), seeded: as llama-recipes (2023)."""
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.recipe.learning_rate, weight_decay=cfg.recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.recipe.lr_gamma)
    autocast = (torch.autocast(device.type, dtype=DTYPES[cfg.recipe.compute_dtype])
                if cfg.recipe.autocast else contextlib.nullcontext())
    return opt, sched, autocast


def train(cfg: RunConfig, model, train_split: TokenizedSplit, out_dir: Path, pad_id: int,
          progress=print) -> TrainResult:
    """Train ``model`` (a PeftModel) on ``train_split``; write steps.jsonl and the adapter to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(p for p in model.parameters()).device
    bs = cfg.batch_size
    steps_per_epoch = train_split.steps_per_epoch(bs)
    result = TrainResult(status="ok", batch_size=bs, steps_per_epoch=steps_per_epoch, steps_done=0,
                         total_steps=0, tokens_per_step=bs * train_split.seq_len)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={bs}: larger than the {len(train_split.rows)} training rows; expected at most {len(train_split.rows)}")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    result.total_steps = total
    every = cfg.log_every or max(1, total // 20)  # progress lines; steps.jsonl gets every step

    # --- setup
    opt, sched, autocast = optimizer_setup(model, cfg, device)
    meter = MemoryMeter(device)
    model.train()
    log = (out_dir / "steps.jsonl").open("w")
    times: list[float] = []
    step_tokens: list[int] = []
    peaks: dict[str, float] = {}
    step = 0
    progress(f"training: batch size {bs}, {total} steps ({steps_per_epoch} per epoch), "
             f"{result.tokens_per_step} tokens per step, device {device}")
    t_start = time.perf_counter()
    outputs = loss = None
    try:
        for epoch in range(cfg.epochs):
            for batch in batches(train_split, bs, pad_id):
                if step >= total:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                n_tokens = int(batch["attention_mask"].sum())
                meter.reset()
                _sync(device)
                t0 = time.perf_counter()
                with autocast:
                    loss = forward_loss(model, batch, cfg.recipe)  # outputs.loss, or loralab.fast's chunked CE
                loss_value = loss.detach()
                del outputs  # free the logits before backward (they would peak with its memory)
                outputs = None
                loss.backward()
                loss = None
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                dt = time.perf_counter() - t0
                step += 1
                lv = float(loss_value)
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss is {lv} at step {step}")
                mem = meter.read()
                for k, v in mem.items():
                    if v is not None:
                        peaks[k] = max(peaks.get(k, 0.0), v)
                times.append(dt)
                step_tokens.append(n_tokens)
                result.losses.append(lv)
                rec = {"step": step, "epoch": epoch, "loss": lv, "lr": opt.param_groups[0]["lr"],
                       "tokens": n_tokens, "tokens_per_s": n_tokens / dt, "step_time_s": dt,
                       "elapsed_s": time.perf_counter() - t_start, **mem}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                result.steps_done = step
                if step == 1 or step == total or step % every == 0:
                    progress(f"step {step}/{total}  loss {lv:.4f}  {n_tokens / dt:,.0f} tok/s  "
                             f"{dt:.2f} s/step" + (f"  peak alloc {mem['peak_allocated_gib']:.2f} GiB  "
                             f"reserved {mem['peak_reserved_gib']:.2f} GiB" if meter.cuda else ""))
            sched.step()  # StepLR once per epoch, as llama-recipes
            if step >= total:
                break
    except Exception as exc:  # noqa: BLE001 - only OOM is a result; everything else re-raises
        if not is_oom(exc):
            log.close()
            raise
        result.status = "oom"
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result.oom_memory = {"at_step": step + 1, **meter.now()}
        progress(f"out of memory at step {step + 1} (batch size {bs}): {result.oom_memory}")
        outputs = loss = None
        opt.zero_grad(set_to_none=True)
        del opt
        free_memory(device)
    finally:
        log.close()

    # --- finish
    for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_active_gib"):
        setattr(result, k, peaks.get(k))
    result.peak_device_used_gib = peaks.get("device_used_gib")
    if times:
        k = 2 if len(times) > 4 else 0  # the first steps include warm-up
        steady = times[k:]
        result.step_time_s = sum(steady) / len(steady)
        # throughput counts the tokens trained on (padding excluded), so unpacked rows are not inflated
        result.tokens_per_step = sum(step_tokens[k:]) / len(steady)
        result.tokens_per_s = sum(step_tokens[k:]) / sum(steady)
        result.final_loss = result.losses[-1]
        if step >= steps_per_epoch:
            result.epoch_time_s = sum(times[:steps_per_epoch])
            result.epoch_time_kind = "measured"
        else:
            result.epoch_time_s = result.step_time_s * steps_per_epoch
            result.epoch_time_kind = f"extrapolated from {len(steady)} steps"
    if result.status == "ok":
        adapter = out_dir / "adapter"
        model.save_pretrained(adapter)
        result.adapter_dir = str(adapter)
    (out_dir / "train_result.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result
