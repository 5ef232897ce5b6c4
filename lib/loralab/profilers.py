"""Measured FLOPs and speed of a LoRA step: torch FlopCounterMode, DeepSpeed, timers.

Cross-checks for the analytic count in ``loralab.flops``:

* ``count_step_flops``: torch's ``FlopCounterMode`` over one real training step
  (forward + backward). It counts matmul-like aten ops only (mm, addmm, bmm,
  SDPA kernels), at the shapes they run: full s x s attention, the SDPA
  backward as 5 forward-sized matmuls, checkpoint recompute included, i.e.
  *hardware* FLOPs. It does not see custom kernels: bitsandbytes' int8 / 4-bit
  matmuls are invisible (their fp16 dequantized backward matmul is seen).
  torch has no formula for the CPU flash-attention op; loralab registers the
  one torch uses for the CUDA flash kernel (``cpu_sdpa=True``).
* ``deepspeed_profile``: DeepSpeed's ``get_model_profile`` as the study used
  it: one forward, FLOPs / MACs / parameters. Its training convention is
  step = 3 x forward (backward = 2 x forward, i.e. full fine-tuning with weight
  gradients) which overcounts LoRA, and it patches ``F.linear`` /
  ``torch.matmul``, so bitsandbytes kernels are invisible to it too.
  It calls ``model.eval()``; we restore the previous mode.
* ``measure_matmul_peak``: the matmul TFLOP/s this device reaches now (bf16, or FP8 via ``_scaled_mm``).
* ``time_steps``: seconds per optimizer step, synchronised.

Every measurement runs the step that trains (``loralab.train``), on a model from ``loralab.model``
(``build_random_model`` for the random-weight shapes: FLOPs and time do not depend on the values).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from loralab.config import Recipe
from loralab.device import resolve_device, sync

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the step the profilers measure

def random_batch(vocab: int, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A packed batch of random token ids (labels = input_ids, no padding), as the training loop feeds it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_module(model, recipe: Recipe | None):
    """The module ``loralab.train``'s step calls: the PeftModel with the recipe's loss (one process)."""
    from loralab.distributed import LossModule

    return model if isinstance(model, LossModule) else LossModule(model, recipe)


# ---------------------------------------------------------------- FlopCounterMode

def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # same as torch's sdpa_backward_flop_count: recompute Q K^T, then dP, dV, dQ, dK
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d + d_v + d_v + d + d)


def _custom_mapping(cpu_sdpa: bool) -> dict:
    if not cpu_sdpa:
        return {}
    aten = torch.ops.aten
    m = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        m[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        m[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return m


def count_step_flops(model, batch: dict[str, torch.Tensor], recipe: Recipe | None = None,
                     cpu_sdpa: bool = True) -> dict[str, Any]:
    """torch FlopCounterMode over one real training step (``loralab.train.forward_backward``, no optimizer step).

    Returns {"total", "forward", "backward", "by_op", "convention"}. "total" counts the step as it trains
    (checkpoint recompute falls in backward; the chunked cross-entropy computes its input gradient in the
    forward); "forward" counts the same forward once more without autograd, so "backward" = total - forward
    is the work the backward pass needs wherever the step does it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from loralab.train import forward_backward

    m = step_module(model, recipe)
    mapping = _custom_mapping(cpu_sdpa)
    was_training = m.training
    m.train()
    with FlopCounterMode(display=False, custom_mapping=mapping) as fwd_counter, torch.no_grad():
        m(batch)
    with FlopCounterMode(display=False, custom_mapping=mapping) as step_counter:
        forward_backward(m, batch)
    m.zero_grad(set_to_none=True)
    m.train(was_training)
    by_op: dict[str, int] = {}
    for op, n in step_counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    total, fwd = int(step_counter.get_total_flops()), int(fwd_counter.get_total_flops())
    return {
        "total": total,
        "forward": fwd,
        "backward": total - fwd,
        "by_op": by_op,
        "convention": "torch FlopCounterMode: matmul ops as executed (hardware FLOPs), full s x s attention,"
                      " fused-attention backward = 5 matmuls; bitsandbytes int8/4-bit kernels not seen",
    }


# ---------------------------------------------------------------- DeepSpeed

DEEPSPEED_CONVENTION = (
    "DeepSpeed FLOPs profiler (get_model_profile, as the study): one forward, F.linear/torch.matmul/SDPA"
    " and elementwise functionals; training step = 3 x forward (backward = 2 x forward: full fine-tuning,"
    " overcounts LoRA); bitsandbytes int8/4-bit matmuls not seen")


def deepspeed_profile(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DeepSpeed's ``get_model_profile`` on one forward, with its convention, or why it could not run.

    Returns {"available", "forward_flops", "forward_macs", "params", "step_flops_ds_convention",
    "convention", "error"}. Restores the model's train/eval mode afterwards.
    """
    out: dict[str, Any] = {"available": False, "forward_flops": None, "forward_macs": None, "params": None,
                           "step_flops_ds_convention": None, "convention": DEEPSPEED_CONVENTION, "error": None}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else deepspeed warns while guessing
    try:
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        from deepspeed.profiling.flops_profiler import get_model_profile
    except Exception as e:  # not installed, or no build for this machine
        out["error"] = f"deepspeed not importable: {type(e).__name__}: {e}"
        return out
    was_training = model.training
    try:
        with torch.no_grad():  # get_model_profile runs forward with grad on; counts do not need it
            flops, macs, params = get_model_profile(model, kwargs={"input_ids": batch["input_ids"]}, print_profile=False,
                                                    detailed=False, warm_up=0, as_string=False)
        out.update(available=True, forward_flops=int(flops), forward_macs=int(macs), params=int(params),
                   step_flops_ds_convention=3 * int(flops))
    except Exception as e:
        out["error"] = f"deepspeed profile failed: {type(e).__name__}: {e}"
    finally:
        model.train(was_training)  # get_model_profile leaves the model in eval mode
    return out


# ---------------------------------------------------------------- time and peak

def measure_matmul_peak(device: str | torch.device = "auto", dtype: torch.dtype = torch.bfloat16,
                        n: int = 8192, iters: int = 20) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on ``device`` (best of ``iters`` timed runs).

    FLOPs = 2 n^3 per matmul. On CPU n is capped at 1024 (a few seconds). ``dtype=torch.float8_e4m3fn``:
    the GEMM of the fp8 recipes (loralab.fp8.scaled_mm: e4m3 operands, rowwise fp32 scales, bf16 out,
    Hopper's fast accumulation), the peak their MFU is also reported against.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cpu":
        n, iters = min(n, 1024), min(iters, 3)
    fp8 = dtype == getattr(torch, "float8_e4m3fn", None)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if fp8 else dtype)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if fp8 else dtype)
    if fp8:
        from loralab.fp8 import scaled_mm

        a, b_t = a.to(dtype), b.to(dtype).t()  # b.t(): column-major, as _scaled_mm's second operand must be
        sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)

        def mm():
            return scaled_mm(a, b_t, sa, sb, fast_accum=True)
    else:
        def mm():
            return a @ b
    for _ in range(2):  # warm-up
        mm()
    best = float("inf")
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        mm()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def time_steps(model, batch: dict[str, torch.Tensor], n_steps: int = 3, warmup: int = 1,
               recipe: Recipe | None = None, lr: float = 1e-4) -> list[float]:
    """Seconds per training step (``loralab.train.training_step``: forward, loss, backward, AdamW step),
    after ``warmup`` untimed steps."""
    from loralab.distributed import DistContext
    from loralab.train import training_step

    m = step_module(model, recipe)
    dev = batch["input_ids"].device
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ctx = DistContext(device=dev)
    m.train()
    times = []
    for i in range(warmup + n_steps):
        sync(dev)
        t0 = time.perf_counter()
        training_step(m, [batch], opt, ctx)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
