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

``build_lora_model`` builds a random-weight Llama + peft LoRA for a recipe
(a stand-in until ``loralab.model`` is used; the FLOPs do not depend on it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Any

import torch

from loralab import allocator
from loralab.config import ConfigError, Recipe

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """loralab.model.resolve_device: one place decides devices (CUDA ones carry their index)."""
    from loralab.model import resolve_device as _resolve

    return _resolve(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: timings need the kernels finished


# ---------------------------------------------------------------- model builder

def _quantize_int8(model: torch.nn.Module, device: torch.device) -> None:
    """Swap every decoder nn.Linear for bitsandbytes Linear8bitLt (LLM.int8, threshold 6)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                w16 = lin.weight.data.to(device=device, dtype=torch.float16)
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(w16)
                del w16
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                p = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
                p.CB, p.SCB = cb, scb
                new.weight = p
                setattr(parent, name, new)
    model.is_loaded_in_8bit = True  # what peft checks to dispatch its bnb LoRA layer


def _quantize_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Swap every decoder nn.Linear for bitsandbytes Linear4bit (NF4, double quantization)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                        compute_dtype=compute_dtype, compress_statistics=True,
                                        quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False,
                                               compress_statistics=True, quant_type="nf4")
                new = new.to(device)
                setattr(parent, name, new)
    model.is_loaded_in_4bit = True


def build_lora_model(llama_config: Any, recipe: Recipe, device: str | torch.device = "auto", seed: int = 0):
    """Random-weight Llama in ``llama_config``'s shape with the recipe's LoRA, in train mode.

    Weights: created on the meta device, materialised on ``device`` (no CPU copy and
    no disk folder of a 7B model), initialised N(0, 0.02). Quantized recipes swap
    decoder linears for bitsandbytes modules (the layers ``from_pretrained`` makes
    with a BitsAndBytesConfig). Then ``loralab.model.add_lora``, the training
    path's: peft's prepare for k-bit, reentrant checkpointing with input grads
    (``recipe_step_flops``'s default ``input_requires_grad`` = checkpointing on).
    """
    import copy

    from transformers import LlamaForCausalLM

    dev = resolve_device(device) if isinstance(device, str) else device
    cfg = copy.deepcopy(llama_config)
    cfg._attn_implementation = recipe.attn_implementation
    cfg.use_cache = False
    dtype = _DTYPES[recipe.param_dtype]
    if recipe.quantization == "int8" and dtype == torch.float32:
        dtype = torch.float16  # the study loaded fp16 then int8; prepare_for_kbit makes the rest fp32
    allocator.configure(recipe, dev)  # before the weights reach the GPU
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rope = getattr(cfg, "rope_parameters", None) or {}
    base = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))  # Llama 2: default RoPE
    for mod in model.modules():  # to_empty left the RoPE buffers uninitialised: fp32, as from_pretrained keeps them
        for buf in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(mod, buf, None), torch.Tensor):
                setattr(mod, buf, inv_freq.clone())
    if recipe.quantization == "int8":
        _quantize_int8(model, dev)
    elif recipe.quantization == "nf4":
        _quantize_nf4(model, dev, _DTYPES[recipe.compute_dtype])
    from loralab.model import add_lora  # the training path's own prepare / checkpointing / LoRA

    model = add_lora(model, recipe)  # LoRA weights in peft's dtype (fp32: autocast_adapter_dtype)
    model.train()
    return model


def random_batch(vocab: int, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, vocab, (batch_size, seq_len), generator=g).to(device)


def _autocast(model, recipe: Recipe | None):
    if recipe is not None and recipe.autocast:
        dev = next(model.parameters()).device.type
        return torch.autocast(dev, dtype=_DTYPES[recipe.compute_dtype])
    return contextlib.nullcontext()


def train_step(model, input_ids: torch.Tensor, optimizer=None, recipe: Recipe | None = None) -> float:
    """One LoRA step as loralab trains: forward with labels = input_ids, backward, optimizer step."""
    with _autocast(model, recipe):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return float(loss.detach())


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


def count_step_flops(model, input_ids: torch.Tensor, recipe: Recipe | None = None, cpu_sdpa: bool = True) -> dict[str, Any]:
    """torch FlopCounterMode over one real training step (forward, backward; no optimizer step).

    Returns {"total": FLOPs, "forward": FLOPs, "by_op": {op: FLOPs}, "convention": str}.
    Forward and backward are counted in two passes of one mode each, so the
    split is exact (checkpoint recompute falls in backward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = _custom_mapping(cpu_sdpa)
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False, custom_mapping=mapping) as fwd_counter:
        with _autocast(model, recipe):
            loss = model(input_ids=input_ids, labels=input_ids).loss
    with FlopCounterMode(display=False, custom_mapping=mapping) as bwd_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    by_op: dict[str, int] = {}
    for c in (fwd_counter, bwd_counter):
        for op, n in c.get_flop_counts().get("Global", {}).items():
            by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    fwd = int(fwd_counter.get_total_flops())
    return {
        "total": fwd + int(bwd_counter.get_total_flops()),
        "forward": fwd,
        "backward": int(bwd_counter.get_total_flops()),
        "by_op": by_op,
        "convention": "torch FlopCounterMode: matmul ops as executed (hardware FLOPs), full s x s attention,"
                      " fused-attention backward = 5 matmuls; bitsandbytes int8/4-bit kernels not seen",
    }


# ---------------------------------------------------------------- DeepSpeed

DEEPSPEED_CONVENTION = (
    "DeepSpeed FLOPs profiler (get_model_profile, as the study): one forward, F.linear/torch.matmul/SDPA"
    " and elementwise functionals; training step = 3 x forward (backward = 2 x forward: full fine-tuning,"
    " overcounts LoRA); bitsandbytes int8/4-bit matmuls not seen")


def deepspeed_profile(model, input_ids: torch.Tensor) -> dict[str, Any]:
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
            flops, macs, params = get_model_profile(model, kwargs={"input_ids": input_ids}, print_profile=False,
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
        _sync(dev)
        t0 = time.perf_counter()
        mm()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def time_steps(model, input_ids: torch.Tensor, n_steps: int = 3, warmup: int = 1, recipe: Recipe | None = None,
               lr: float = 1e-4) -> list[float]:
    """Seconds per training step (forward, backward, AdamW step), after ``warmup`` untimed steps."""
    dev = input_ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times = []
    for i in range(warmup + n_steps):
        _sync(dev)
        t0 = time.perf_counter()
        train_step(model, input_ids, opt, recipe)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
