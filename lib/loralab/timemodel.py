"""Time of one LoRA training step on a card, part by part, from the FLOPs and bytes loralab already counts.

Each part of the step is work of one *kind*; its time is that work divided by what the kind reaches on the card:

    t(part) = work / (card peak of the kind's format x efficiency of the kind)

with ``work`` in FLOPs for the matmul kinds and in bytes moved for the memory-bound kinds (peak = the card's memory
bandwidth). The efficiencies are measured on the machine at hand (``benchmarks/time_calibration.py`` writes
``time_calibration.json``) and carried to another card as the *same fraction of that card's peak*, kind by kind:
a bf16 GEMM that reaches 66 % of the H200's 989 TFLOP/s is taken to reach 66 % of an L4's 121. That assumption is
the model's main limit: architectures differ (e.g. Hopper's FP32 peak counts dual-issue FMA that SGEMM rarely fills);
the committed checks (``plan.study_check``) show what it costs on the study's A100. Nothing is fitted to another
card's published figure.

Parts (``StepTime.parts``, seconds):
  frozen_gemm  frozen base linears (forward, input gradient, checkpoint recompute) and the LM head:
               FLOPs from ``loralab.flops``; kind by format: ``gemm_bf16`` (bf16/fp16 weights, nf4 after
               dequantisation), ``gemm_fp8`` (Recipe.fp8), ``gemm_fp32`` (fp32, no TF32: the study's LM head and
               its dequantised int8 backward), ``int8_bnb`` (bitsandbytes LLM.int8 forward: quantise the input,
               int8 GEMM, dequantise; measured as a whole against the int8 peak; it is not a plain tensor-core
               int8 GEMM).
  lora         adapters: bytes moved (``lora_bytes``) at the ``lora`` efficiency of the bandwidth, plus their FLOPs
               at the GEMM efficiency of their format (r is small: they are memory-bound).
  attention    SDPA: hardware FLOPs (forward, backward, the fused kernel's recompute) at ``attn_sdpa_bf16`` /
               ``attn_sdpa_fp32``; eager: its two matmuls as GEMMs of the activation format plus the B x nh x S x S
               score tensors' passes (mask, softmax, casts, softmax backward) as element-wise bytes.
  elementwise  RMSNorm, RoPE, SiLU x up, residual adds, copies and the loss's softmax: bytes moved
               (``elementwise_bytes``) at the ``elementwise`` efficiency; fewer bytes when torch.compile fuses them.
  quantise     nf4 dequantisation per use, int8 weight dequantisation in backward, FP8 input/gradient
               quantisation: bytes at the ``elementwise`` efficiency.
  optimizer    AdamW over the LoRA parameters: 32 B per parameter (param, grad, two states read and written).
  host         the CPU's time to issue the step's kernels (Python, autograd, launches): measured per decoder layer
               for each way a layer runs (eager, compiled, compiled with the FP8 base) plus a fixed part per step.
               It does not scale with the card. The GPU parts run while the CPU issues, so the step takes
               max(sum of the GPU parts, host).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.cards import Card
from loralab.config import ConfigError, Recipe
from loralab.flops import recipe_step_flops
from loralab.memory import activation_bytes, _compiled, _unquantized_bytes
from loralab.shape import ModelShape

CALIBRATION = Path(__file__).with_name("time_calibration.json")
KINDS = {  # kind: what its efficiency is a fraction of
    "gemm_bf16": "bf16", "gemm_fp32": "fp32", "gemm_fp8": "fp8", "int8_bnb": "int8",
    "attn_sdpa_bf16": "bf16", "attn_sdpa_fp32": "fp32",
    "lora": "bandwidth", "elementwise": "bandwidth", "optimizer": "bandwidth",
}
HOST_FAMILIES = ("eager", "compiled", "compiled_fp8")
ADAMW_BYTES_PER_PARAM = 32
"""fp32 param read + write, grad read, exp_avg and exp_avg_sq read + write (4 B each), zero_grad write."""


@dataclass(frozen=True)
class Calibration:
    """Per-kind efficiencies and host times measured on one card (``calibrated_on``), each with its source."""

    calibrated_on: str
    efficiency: dict[str, float]
    host_ms_per_layer: dict[str, float]
    host_ms_per_step: float
    status: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Calibration":
        """``path``, else $LORALAB_TIME_CALIBRATION, else the packaged ``time_calibration.json``."""
        p = Path(path or os.environ.get("LORALAB_TIME_CALIBRATION") or CALIBRATION)
        try:
            d = json.loads(p.read_text())
            eff = {k: float(v["value"]) for k, v in d["efficiency"].items()}
            host = {k: float(v["value"]) for k, v in d["host_ms_per_layer"].items()}
            srcs = {k: v.get("source", "") for k, v in {**d["efficiency"], **d["host_ms_per_layer"]}.items()}
            cal = cls(calibrated_on=d["calibrated_on"], efficiency=eff, host_ms_per_layer=host,
                      host_ms_per_step=float(d["host_ms_per_step"]["value"]), status=d.get("status", ""),
                      sources=srcs, path=str(p))
        except OSError as e:
            raise ConfigError(f"time calibration {str(p)!r}: {e.strerror or e}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"time calibration {str(p)!r}: expected calibrated_on, efficiency{{kind: {{value}}}}, "
                              f"host_ms_per_layer, host_ms_per_step ({type(e).__name__}: {e})") from None
        missing = [k for k in KINDS if k not in eff] + [k for k in HOST_FAMILIES if k not in host]
        if missing:
            raise ConfigError(f"time calibration {str(p)!r}: lacks {', '.join(missing)}")
        return cal


@dataclass
class StepTime:
    """Predicted seconds of one optimizer step, by part, with the work and kind behind each."""

    parts: dict[str, float] = field(default_factory=dict)
    detail: list[dict[str, Any]] = field(default_factory=list)
    host_s: float = 0.0
    tokens: int = 0

    def add(self, part: str, kind: str, work: float, unit: str, rate: float) -> None:
        """``work`` (FLOPs or bytes) at ``rate`` (FLOP/s or B/s) as part ``part``."""
        if work <= 0:
            return
        t = work / rate
        self.parts[part] = self.parts.get(part, 0.0) + t
        self.detail.append({"part": part, "kind": kind, "work": work, "unit": unit, "rate": rate, "s": t})

    @property
    def gpu_s(self) -> float:
        return sum(self.parts.values())

    @property
    def step_s(self) -> float:
        """max(GPU parts, host): the CPU issues kernels while the GPU runs earlier ones."""
        return max(self.gpu_s, self.host_s)

    @property
    def bound(self) -> str:
        return "host" if self.host_s > self.gpu_s else "GPU"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    def table(self) -> list[dict[str, Any]]:
        """Rows (part, ms, share of the step) plus host and the step: ``pandas.DataFrame(st.table())``."""
        rows = [{"part": k, "ms": v * 1e3, "share %": 100 * v / self.step_s} for k, v in self.parts.items()]
        rows.append({"part": "host (CPU issue; overlaps the GPU)", "ms": self.host_s * 1e3,
                     "share %": 100 * self.host_s / self.step_s})
        rows.append({"part": f"step = max(GPU {self.gpu_s * 1e3:.1f}, host {self.host_s * 1e3:.1f})",
                     "ms": self.step_s * 1e3, "share %": 100.0})
        return rows


# --- bytes of the memory-bound work, per token ---------------------------------------------------------------
def elementwise_bytes(s: ModelShape, recipe: Recipe, seq_len: int, device: str = "cuda") -> dict[str, float]:
    """Bytes per token of one step's memory-bound ops: {"layers": all decoder layers, "loss": LM head softmax}.

    Per layer forward (a = activation bytes; eager PyTorch ops):
      2 RMSNorms (4a + 20) H each (cast to fp32, square-mean, scale, cast back, weight), RoPE 9a (Hq + Hkv)
      (q*cos, rotate_half, *sin, add), 2 residual adds 3aH each, SiLU x up 5aI, attention-output copy 2aHq.
    torch.compile fuses them: 2aH per norm (+ 2aH for the residual it absorbs), RoPE 2a (Hq + Hkv), SiLU x up 3aI,
      the copy 2aHq.
    Backward moves twice the forward's bytes (each op reads its saved input and the incoming gradient, writes
    one); a recomputed forward (checkpointing; compile's min-cut recomputes its pointwise ops too) adds one more.
    Loss per token: HF's fp32 cross-entropy (logits cast, log-softmax, its backward, the cast back): (2l + 32) V with
    l = LM-head bytes; the chunked one (loralab.fast) 20 V (logits, fp32 softmax, the gradient formed in forward).
    """
    a = activation_bytes(recipe)
    H, I, Hq, Hkv = s.H, s.I, s.Hq, s.Hkv
    if _compiled(recipe, device):
        fwd = 2 * (2 * a * H) + 2 * (2 * a * H) + 2 * a * (Hq + Hkv) + 3 * a * I + 2 * a * Hq
        passes = 4  # forward, backward (2x), the pointwise recompute of the min-cut partitioner
    else:
        fwd = 2 * (4 * a + 20) * H + 9 * a * (Hq + Hkv) + 2 * 3 * a * H + 5 * a * I + 2 * a * Hq
        passes = 3 + (1 if recipe.gradient_checkpointing == "full" else 0)
    lh = _unquantized_bytes(recipe)
    loss = 20 * s.V if recipe.cross_entropy == "chunked" else (2 * lh + 32) * s.V
    return {"layers": s.L * fwd * passes, "loss": float(loss)}


def lora_bytes(s: ModelShape, recipe: Recipe) -> float:
    """Bytes per token the adapters move in one step, all layers.

    Per adapted module (d_in -> d_out; la = bytes of the LoRA matmul's dtype: 4 under peft's fp32 adapters, else a):
    forward reads x (la d_in) and adds the update to the base output (read, read, write: 3a d_out); peft's cast of
    x to fp32 adds (a + la) d_in, dropout (a + 1 + a) d_in (copy and mask). Backward twice that; a checkpoint
    recompute one forward more."""
    a = activation_bytes(recipe)
    la = a if recipe.lora_matmul_dtype == "input" else 4
    lin = s.linears()
    total = 0.0
    for t in recipe.lora_targets:
        d_in, d_out = lin[t]
        fwd = la * d_in + 3 * a * d_out + ((a + la) * d_in if la != a else 0)
        if recipe.lora_dropout > 0:
            fwd += (2 * a + 1) * d_in
        total += fwd * (3 + (1 if recipe.gradient_checkpointing == "full" else 0))
    return s.L * total


def quantise_bytes(s: ModelShape, recipe: Recipe, tokens: int) -> float:
    """Bytes per step of (de)quantisation outside the GEMMs.

    nf4: each base weight is dequantised to the compute dtype at every use (forward, input gradient, recompute):
      0.5 B read + 1/64 absmax + 2 B written, 2.5 B per weight per use.
    int8 (bitsandbytes): the backward dequantises CB to the input's dtype (read 1, write a, scale: read a, write a).
    fp8: every GEMM input (forward) and output gradient (backward) is scaled and cast: read a twice (amax, cast),
      write 1 per element; q/k/v and gate/up share their input when fused; W^T per step transposes each weight
      (2 B per weight per backward)."""
    n_w = s.L * s.layer_linear_params()
    ckpt = recipe.gradient_checkpointing == "full"
    a = activation_bytes(recipe)
    if recipe.quantization == "nf4":
        return n_w * 2.5 * (2 + ckpt)
    if recipe.quantization == "int8":
        return n_w * (1 + 3 * a)
    if recipe.fp8 != "off":
        H, I, Hq, Hkv = s.H, s.I, s.Hq, s.Hkv
        shared = recipe.fp8_fused or recipe.fp8_shared_quant
        fwd_in = (H if shared else 3 * H) + Hq + (H if shared else 2 * H) + I
        bwd_dy = (Hq + 2 * Hkv) + H + 2 * I + H
        per_token = (2 * a + 1) * (fwd_in * (1 + ckpt) + bwd_dy)
        wt = 2 * n_w if recipe.fp8_weight_t == "per-step" else 0
        return s.L * per_token * tokens + wt
    return 0.0


def eager_score_bytes(recipe: Recipe) -> float:
    """Bytes per score element (B x nh x S x S, each layer) of eager attention outside its matmuls.
    Forward: the scores written (a), the mask added (read scores and mask, write: 3a), softmax in fp32 (read a,
    write 4), the cast back when a = 2 (4 + a). Backward: dP written (a), cast to fp32 when a = 2 (a + 4),
    softmax backward (read P and dP, write dS: 12), dS cast back when a = 2 (4 + a)."""
    a = activation_bytes(recipe)
    cast = (4 + a) if a != 4 else 0
    fwd = a + 3 * a + a + 4 + cast
    bwd = a + cast + 12 + cast
    return fwd * (1 + (recipe.gradient_checkpointing == "full")) + bwd


# --- the step --------------------------------------------------------------------------------------------------
def _fmt(dtype_bytes: int) -> str:
    return "fp32" if dtype_bytes == 4 else "bf16"


def host_family(recipe: Recipe, device: str = "cuda") -> str:
    if _compiled(recipe, device):
        return "compiled_fp8" if recipe.fp8 != "off" else "compiled"
    return "eager"


def predict_step(model_config, recipe: Recipe, batch_size: int, seq_len: int, card: Card, cal: Calibration,
                 device: str = "cuda") -> StepTime:
    """Predicted time of one training step of ``recipe`` at ``batch_size`` x ``seq_len`` on ``card``."""
    if recipe.liger == "on" or recipe.cross_entropy == "liger":
        raise ConfigError(f"recipe {recipe.name!r}: the time model does not cover Liger's kernels")
    if recipe.fp8 != "off" and not card.fp8:
        raise ConfigError(f"recipe {recipe.name!r} needs FP8 tensor cores (compute capability 8.9+); "
                          f"{card.name} has {card.compute_capability or 'none'}")
    s = ModelShape.of(model_config)
    T = batch_size * seq_len
    F = recipe_step_flops(model_config, recipe, batch_size, seq_len)
    ckpt = recipe.gradient_checkpointing == "full"
    e = cal.efficiency
    bw = card.bandwidth_gbs * 1e9
    st = StepTime(tokens=T)

    def gemm(part: str, kind: str, flops: float) -> None:
        fmt = KINDS[kind]
        st.add(part, kind, flops, "FLOP", card.peak(fmt) * 1e12 * e[kind])

    def mem(part: str, kind: str, nbytes: float) -> None:
        st.add(part, kind, nbytes, "B", bw * e[kind])

    a = activation_bytes(recipe)
    # frozen linears and the LM head
    fwd = F.frozen_fwd * (2 if ckpt else 1)
    if recipe.fp8 != "off":
        gemm("frozen_gemm", "gemm_fp8", fwd + F.frozen_bwd)
    elif recipe.quantization == "int8":
        gemm("frozen_gemm", "int8_bnb", fwd)
        gemm("frozen_gemm", f"gemm_{_fmt(a)}", F.frozen_bwd)  # dequantised weight, the input's dtype
    elif recipe.quantization == "nf4":
        gemm("frozen_gemm", f"gemm_{_fmt(2 if recipe.compute_dtype != 'float32' else 4)}", fwd + F.frozen_bwd)
    else:
        gemm("frozen_gemm", f"gemm_{_fmt(2 if recipe.param_dtype != 'float32' else 4)}", fwd + F.frozen_bwd)
    head_kind = "gemm_fp8" if recipe.fp8_lm_head else f"gemm_{_fmt(_unquantized_bytes(recipe))}"
    gemm("frozen_gemm", head_kind, F.head_fwd + F.head_bwd)
    # LoRA
    la = a if recipe.lora_matmul_dtype == "input" else 4
    gemm("lora", f"gemm_{_fmt(la)}", F.lora_fwd * (2 if ckpt else 1) + F.lora_bwd)
    mem("lora", "lora", lora_bytes(s, recipe) * T)
    # attention
    attn = F.attn_fwd * (2 if ckpt else 1) + F.attn_bwd + F.attn_kernel_recompute
    if recipe.attn_implementation == "sdpa":
        gemm("attention", f"attn_sdpa_{_fmt(a)}", attn)
    else:
        gemm("attention", f"gemm_{_fmt(a)}", attn)
        mem("attention", "elementwise", s.L * batch_size * s.nh * seq_len * seq_len * eager_score_bytes(recipe))
    # memory-bound ops, quantisation, optimizer
    eb = elementwise_bytes(s, recipe, seq_len, device)
    mem("elementwise", "elementwise", (eb["layers"] + eb["loss"]) * T)
    mem("quantise", "elementwise", quantise_bytes(s, recipe, T))
    mem("optimizer", "optimizer", ADAMW_BYTES_PER_PARAM * s.lora_params(recipe))
    fam = host_family(recipe, device)
    st.host_s = (s.L * cal.host_ms_per_layer[fam] * (1.5 if ckpt else 1.0) + cal.host_ms_per_step) / 1e3
    return st
