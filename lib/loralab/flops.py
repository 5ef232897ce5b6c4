"""Analytic FLOPs of one LoRA training step of a Llama model.

Conventions (units: FLOPs = floating-point operations, not per second):

* A matmul (m x k) @ (k x n) costs ``2*m*k*n`` FLOPs (one multiply and one add
  per MAC), so ``MACs = FLOPs / 2``. Only matmuls are counted: RMSNorm, SiLU,
  softmax, RoPE rotation, residual adds and the loss are elementwise, O(tokens *
  hidden), about 0.1 % of the total at 7B, and torch's ``FlopCounterMode`` does
  not count them either. (Kaplan et al. 2020, "Scaling Laws", Sec. 2.1;
  Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters using Megatron-LM", App. A.)
* Training: the backward of ``y = x @ W^T`` is two matmuls of the forward's size,
  ``dx = dy @ W`` (input gradient) and ``dW = dy^T @ x`` (weight gradient), hence
  the usual "backward = 2 x forward", "6 N FLOPs per token" (Kaplan Sec. 2.1).
  **LoRA breaks that rule**: the base weights are frozen, so each frozen linear
  costs forward + input gradient only (4 instead of 6 per weight and token), and
  the input gradient is skipped where autograd does not need it (layer 0 when the
  embedding output does not require grad). The adapters ``A`` (r x in) and
  ``B`` (out x r) cost forward, weight gradient and input gradient (Hu et al.
  2021, "LoRA", Sec. 4.2 notes the backward saving).
* Attention per layer: ``Q K^T`` and ``P V`` cost ``2*b*h*s*s*d_head`` each
  (h = query heads; grouped K/V are broadcast to h). The *model FLOPs*
  convention of PaLM (Chowdhery et al. 2022, App. B: ``6N + 12*L*H*Q*T``) and
  Megatron counts the full s x s matrix; FlashAttention (Dao 2022) reports the
  causal half. Switch: ``causal_attention_discount`` (default False: full, the
  convention of PaLM, Megatron, FlopCounterMode and DeepSpeed).
* Model FLOPs vs hardware FLOPs (PaLM App. B): *model FLOPs* are what the step
  needs mathematically; *hardware FLOPs* add recomputation: activation
  checkpointing re-runs one forward of every decoder layer in backward, and
  fused attention kernels (flash / memory-efficient SDPA) recompute ``Q K^T``
  in backward and return dQ, dK, dV whether or not they are needed (torch's
  flop formula: 5 matmuls of the forward's size in backward).
  MFU = model FLOPs / time / peak, HFU = hardware FLOPs / time / peak.
* LM head: frozen in LoRA (input gradient only). Embedding: a gather, 0 FLOPs.
  RoPE's ``inv_freq @ position_ids`` has inner size 1: torch runs it as an
  elementwise outer product, not a matmul (not counted, by torch either).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from loralab.config import ConfigError, Recipe
from loralab.shape import ModelShape

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step (forward + backward), split by where they go."""

    frozen_fwd: int
    frozen_bwd: int  # input gradients only
    lora_fwd: int
    lora_bwd: int  # weight gradients + input gradients
    attn_fwd: int
    attn_bwd: int  # the gradients autograd needs
    head_fwd: int
    head_bwd: int
    checkpoint_recompute: int  # one forward of every decoder layer (hardware only)
    attn_kernel_recompute: int  # extra work of fused attention backward (hardware only)
    tokens: int
    causal_attention_discount: bool

    @property
    def forward(self) -> int:
        return self.frozen_fwd + self.lora_fwd + self.attn_fwd + self.head_fwd

    @property
    def backward(self) -> int:
        return self.frozen_bwd + self.lora_bwd + self.attn_bwd + self.head_bwd

    @property
    def model_flops(self) -> int:
        """What the step needs: forward + backward, no recomputation."""
        return self.forward + self.backward

    @property
    def hardware_flops(self) -> int:
        """What the GPU executes: model FLOPs + checkpoint recompute + fused-attention recompute."""
        return self.model_flops + self.checkpoint_recompute + self.attn_kernel_recompute

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the model FLOPs (all counted work is matmul: FLOPs / 2)."""
        return self.model_flops // 2

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(forward=self.forward, backward=self.backward, model_flops=self.model_flops,
                 hardware_flops=self.hardware_flops, macs=self.macs)
        return d


def lora_step_flops(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    lora_r: int,
    lora_targets: Iterable[str],
    gradient_checkpointing: bool,
    input_requires_grad: bool,
    attention_kernel: str = "eager",
    causal_attention_discount: bool = False,
) -> StepFlops:
    """Analytic FLOPs of one LoRA training step, following what autograd computes.

    batch_size x seq_len tokens, LoRA rank ``lora_r`` on ``lora_targets`` of every
    decoder layer, base weights and LM head frozen.

    input_requires_grad: True when the embedding output requires grad (peft's
      ``prepare_model_for_kbit_training`` / ``enable_input_require_grads``). When
      False, layer 0's frozen q/k/v (and whatever else sees only grad-free
      inputs) get no backward at all.
    attention_kernel: "eager" (matmul + softmax: backward = the gradients
      needed, up to 2 x forward) or "fused" (flash / memory-efficient SDPA:
      backward recomputes Q K^T and returns dQ, dK, dV: 5 forward-sized matmuls,
      the excess counted as hardware FLOPs).
    causal_attention_discount: halve the attention matmuls (FlashAttention's
      convention). Default False: the full s x s matrix (PaLM, Megatron,
      FlopCounterMode, DeepSpeed).
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size={batch_size}, seq_len={seq_len}: expected integers >= 1")
    if attention_kernel not in ("eager", "fused"):
        raise ConfigError(f"attention_kernel={attention_kernel!r}: expected 'eager' or 'fused'")
    targets = set(lora_targets)
    bad = targets - set(LINEARS)
    if bad:
        raise ConfigError(f"lora_targets={sorted(bad)}: expected names from {', '.join(LINEARS)}")
    T = batch_size * seq_len
    dims = shape.linears()
    # one (b*h) x s x s x d_head attention matmul
    att_mm = 2 * batch_size * shape.nh * seq_len * seq_len * shape.hd
    if causal_attention_discount:
        att_mm //= 2

    tot = dict(frozen_fwd=0, frozen_bwd=0, lora_fwd=0, lora_bwd=0, attn_fwd=0, attn_bwd=0,
               attn_kernel_recompute=0)
    layer_fwd = 0
    x_grad = input_requires_grad  # does this layer's input (the residual stream) require grad?
    for _ in range(shape.L):
        fwd0 = sum(tot[k] for k in ("frozen_fwd", "lora_fwd", "attn_fwd"))
        out_grad: dict[str, bool] = {}

        def linear(name: str, in_grad: bool) -> None:
            i, o = dims[name]
            tot["frozen_fwd"] += 2 * T * i * o
            if in_grad:
                tot["frozen_bwd"] += 2 * T * i * o  # dx = dy @ W (no dW: frozen)
            if name in targets:
                tot["lora_fwd"] += 2 * T * i * lora_r + 2 * T * lora_r * o
                # dB, dA (weight grads) + d(A x) (B's input grad, always: A is trainable)
                tot["lora_bwd"] += 2 * T * lora_r * o + 2 * T * i * lora_r + 2 * T * lora_r * o
                if in_grad:
                    tot["lora_bwd"] += 2 * T * i * lora_r  # dx through A
            out_grad[name] = in_grad or name in targets

        # attention block: input = RMSNorm(x), requires grad iff x does
        for n in ("q_proj", "k_proj", "v_proj"):
            linear(n, x_grad)
        q, k, v = out_grad["q_proj"], out_grad["k_proj"], out_grad["v_proj"]
        p = q or k  # softmax(Q K^T) requires grad
        tot["attn_fwd"] += 2 * att_mm
        needed = att_mm * (int(q) + int(k) + int(p) + int(v))  # dQ, dK, dP, dV
        tot["attn_bwd"] += needed
        if attention_kernel == "fused" and (q or k or v):
            tot["attn_kernel_recompute"] += 5 * att_mm - needed
        attn_grad = q or k or v
        linear("o_proj", attn_grad)
        x_grad = x_grad or out_grad["o_proj"]  # residual add
        # MLP block: down(silu(gate(x)) * up(x))
        linear("gate_proj", x_grad)
        linear("up_proj", x_grad)
        linear("down_proj", out_grad["gate_proj"] or out_grad["up_proj"])
        x_grad = x_grad or out_grad["down_proj"]
        layer_fwd += sum(tot[k] for k in ("frozen_fwd", "lora_fwd", "attn_fwd")) - fwd0

    head = 2 * T * shape.H * shape.V
    return StepFlops(
        **tot,
        head_fwd=head,
        head_bwd=head if x_grad else 0,
        checkpoint_recompute=layer_fwd if gradient_checkpointing else 0,
        tokens=T,
        causal_attention_discount=causal_attention_discount,
    )


def recipe_step_flops(
    config: Any,
    recipe: Recipe,
    batch_size: int,
    seq_len: int,
    *,
    causal_attention_discount: bool = False,
    input_requires_grad: bool | None = None,
) -> StepFlops:
    """``lora_step_flops`` for a LlamaConfig and a loralab recipe.

    input_requires_grad defaults to what ``loralab.model.add_lora`` does: the
    embedding output requires grad exactly when checkpointing is on (reentrant
    checkpointing needs a grad-requiring input: ``enable_input_require_grads``).
    """
    if input_requires_grad is None:
        input_requires_grad = recipe.gradient_checkpointing == "full"
    return lora_step_flops(
        ModelShape.of(config),
        batch_size=batch_size,
        seq_len=seq_len,
        lora_r=recipe.lora_r,
        lora_targets=recipe.lora_targets,
        gradient_checkpointing=recipe.gradient_checkpointing == "full",
        input_requires_grad=input_requires_grad,
        attention_kernel="eager" if recipe.attn_implementation == "eager" else "fused",
        causal_attention_discount=causal_attention_discount,
    )


# Dense (no 2:4 sparsity) peaks per card and number format: loralab.cards (cards.json, with each figure's data
# sheet). One table for MFU here and for the planner (loralab.plan).


def device_peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """Data-sheet dense peak for a ``torch.cuda.get_device_name()`` string, or None if unknown.

    MFU in loralab divides by the **bf16 dense tensor-core peak** for every
    recipe: it is the ceiling of the hardware for this work. The seed recipe's
    own matmuls run in fp32 (LoRA, attention, LM head: 67 TFLOP/s on H100/H200,
    19.5 on A100) and fp16 inside bitsandbytes int8: against their own peaks it
    would look efficient while being slow, which is the point the report makes.
    An FP8 base (``Recipe.fp8``, loralab.fp8) runs the same matmuls, so the same FLOPs; its MFU is given
    against both the bf16 and the FP8 matmul peaks (measured: ``profilers.measure_matmul_peak``).
    """
    from loralab.cards import card_of_device

    card = card_of_device(device_name)
    if card is None:
        return None
    if dtype not in card.tflops:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(card.tflops)}")
    return card.tflops[dtype]


def sweep_metrics(
    config: Any,
    recipe: Recipe,
    batch_size: int,
    seq_len: int,
    step_time_s: float | None,
    peak_tflops: float | None,
    *,
    causal_attention_discount: bool = False,
) -> dict[str, Any]:
    """The FLOPs columns of ``summary.json["sweep"][i]``.

    flops_per_step: analytic model FLOPs of one step (FLOPs, full-attention convention);
    macs_per_step: its multiply-accumulates (= FLOPs / 2);
    hardware_flops_per_step: + checkpoint and fused-attention recompute;
    tflops_per_s: model FLOPs / step time / 1e12 (achieved TFLOP/s);
    mfu / hfu: achieved / peak, as a fraction (None without a time or a peak).
    """
    f = recipe_step_flops(config, recipe, batch_size, seq_len,
                          causal_attention_discount=causal_attention_discount)
    out: dict[str, Any] = {
        "flops_per_step": f.model_flops,
        "macs_per_step": f.macs,
        "hardware_flops_per_step": f.hardware_flops,
        "tflops_per_s": None,
        "mfu": None,
        "hfu": None,
        "peak_tflops": peak_tflops,
    }
    if step_time_s is not None and step_time_s > 0:
        out["tflops_per_s"] = f.model_flops / step_time_s / 1e12
        if peak_tflops:
            out["mfu"] = out["tflops_per_s"] / peak_tflops
            out["hfu"] = f.hardware_flops / step_time_s / 1e12 / peak_tflops
    return out


def linear_fit_r2(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a*x + b and its R^2: (a, b, r2)."""
    n = len(x)
    if n < 2 or n != len(y):
        raise ConfigError(f"linear_fit_r2: expected two equal-length lists of >= 2 points, got {len(x)}, {len(y)}")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y))
    a = sxy / sxx
    b = my - a * mx
    ss_res = sum((yi - (a * xi + b)) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return a, b, r2
