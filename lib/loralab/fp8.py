"""A frozen FP8 base for LoRA: the seven linears of every decoder layer (and optionally the LM head) in e4m3.

In LoRA the base weights never change, so they are quantised once, at load, from the bf16 weights
(the bf16 copy is freed). Per frozen linear ``y = x W^T`` autograd needs two GEMMs, both in FP8 via
``torch._scaled_mm`` (Hopper's FP8 tensor cores, bf16 outputs): the forward ``x W^T`` and the input
gradient ``dy W``. There is no weight-gradient GEMM (W is frozen). The LoRA adapters stay as in
``fast``: bf16 matmuls with fp32 master weights, on the bf16 input.

Numerics (``quantize``): e4m3 (3 mantissa bits, max 448), scaled so each row's amax maps to 448.

* ``scaling="rowwise"``: one fp32 scale per weight output channel (W is (N, K): per row of W) and one
  per token of the activation or gradient (per row of x / dy). ``scaling="tensorwise"``: one scale per
  tensor (a whole-tensor amax before every cast: no faster than bf16 once that is counted, per the
  earlier H200 measurement).
* ``_scaled_mm`` takes only "TN" operands (both K-contiguous): ``x W^T`` reads W as stored, but
  ``dy W`` needs W^T stored row-major. Rowwise, W = diag(s_w) Wq, so ``dy W = (dy diag(s_w)) Wq``: the
  weight's row scales are folded into dy before dy is quantised (one multiply inside the cast), and
  the input-gradient GEMM reads the *same* FP8 values transposed, with unit column scales. So no
  requantisation, no second rounding of W, and dx is the exact transpose-product of the weight the
  forward used. ``weight_t="copy"`` keeps Wq^T (+1 B per weight; the base then costs as much memory as
  bf16); ``weight_t="per-step"`` transposes Wq in each backward (an FP8 copy: 2 B of memory traffic per
  weight and step, one weight's worth of transient memory). Both give bit-identical dx.
* Activations and output gradients are quantised on the fly, rowwise, once per tensor. Sharing is
  guaranteed by construction, not left to CSE: with ``fused=True`` q/k/v are one GEMM of N = Hq + 2 Hkv
  and gate/up one of N = 2 I over a concatenated FP8 weight (rowwise scales are per output row, so the
  fused weight holds exactly the per-module FP8 values); with ``fused=False, shared_quant=True`` the
  patched attention/MLP forward quantises the shared input once and feeds it to the three/two GEMMs;
  ``fused=False, shared_quant=False`` is peft's own per-module path (each GEMM quantises its input;
  torch.compile's CSE may merge those anyway: that is what the ablation measures). Under the regional
  ``torch.compile`` of ``loralab.fast.configure_layers`` Inductor fuses each cast (amax, scale, clamp,
  e4m3) into the kernel that produces its input (RMSNorm, SiLU * up, the RoPE backward, ...).

Entry point: ``apply_fp8(model, recipe)`` (from ``loralab.fast.apply_levers``) checks the device (FP8
tensor cores: compute capability 8.9+, and a probe of the scaling asked for) and raises ConfigError
otherwise: no silent fallback. The numeric core (``quantize``, ``FP8Weight``, ``fp8_matmul``,
``FP8Linear``, ``convert_model``) runs on CPU too (torch's CPU ``_scaled_mm``), for the tests.
Memory terms for ``loralab.memory``: ``linear_weight_bytes``, ``weight_terms``,
``layer_saved_bytes_per_token``, ``backward_transient_bytes``.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
# At module level, not inside the patched forward: an import inside compiled code makes Dynamo (torch 2.11)
# skip the whole frame ("Bad import result: _LazyModule"), so attention ran eagerly between graphs.
from transformers.models.llama import modeling_llama

from loralab.config import FP8_MODES, FP8_WEIGHT_T, ConfigError

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
AMAX_EPS = 1e-12
"""Floor of an amax, so an all-zero row quantises to zeros with a finite scale (torchao uses the same)."""
SCALINGS = tuple(m for m in FP8_MODES if m != "off")
FP8_CC = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards."""


@dataclass(frozen=True)
class FP8Settings:
    """How the FP8 base is built and run (the recipe's fp8* fields, plus the accumulation switches)."""

    scaling: str = "rowwise"
    weight_t: str = "copy"
    fused: bool = True
    shared_quant: bool = True
    lm_head: bool = False
    fast_accum_fwd: bool = True
    """Hopper's fast FP8 accumulation (no periodic promotion to fp32) in the forward GEMMs: torchao's default."""
    fast_accum_bwd: bool = False
    """The same for the input-gradient GEMMs (K up to 2 I = 22,016 there): off, as torchao's default."""

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ConfigError(f"fp8 scaling={self.scaling!r}: expected one of {', '.join(SCALINGS)}")
        if self.weight_t not in FP8_WEIGHT_T:
            raise ConfigError(f"fp8_weight_t={self.weight_t!r}: expected one of {', '.join(FP8_WEIGHT_T)}")

    @classmethod
    def of(cls, recipe) -> "FP8Settings":
        return cls(scaling=recipe.fp8, weight_t=recipe.fp8_weight_t, fused=recipe.fp8_fused,
                   shared_quant=recipe.fp8_shared_quant, lm_head=recipe.fp8_lm_head)

    def replace(self, **changes: Any) -> "FP8Settings":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        grouping = ("fused q/k/v and gate/up GEMMs" if self.fused else
                    ("separate GEMMs, shared input quantisation" if self.shared_quant else "separate GEMMs, per-GEMM quantisation"))
        accum = "fast accumulation " + ("fwd+bwd" if self.fast_accum_bwd else "fwd" if self.fast_accum_fwd else "off")
        return (f"{self.scaling} e4m3, {grouping}, W^T {'kept (copy)' if self.weight_t == 'copy' else 'per step'}, "
                f"LM head {'fp8' if self.lm_head else 'bf16'}, {accum}")


# ------------------------------------------------------------------ numerics (CPU and CUDA)

def quantize(x: torch.Tensor, scaling: str = "rowwise", col_scale: torch.Tensor | None = None):
    """(x_q, scale) with x * col_scale ~= x_q * scale: x_q float8_e4m3fn, scale fp32 (rows, 1) or ().

    Rowwise: one scale per row (a token of x or dy, an output channel of W); tensorwise: one.
    ``col_scale`` (1, N) multiplies the columns first (the weight's row scales folded into dy).
    Round to nearest; |x_q * scale - x| <= 2^-4 |x| in e4m3's normal range (3 mantissa bits).
    x is detached: quantisation is not differentiated (the FP8 GEMM's autograd gives x its gradient).
    """
    x = x.detach().float()
    if col_scale is not None:
        x = x * col_scale
    amax = x.abs().amax(dim=-1, keepdim=True) if scaling == "rowwise" else x.abs().amax()
    amax = amax.clamp(min=AMAX_EPS)
    x_q = (x * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x_q, amax / E4M3_MAX


def scaled_mm(a_q: torch.Tensor, b_t: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              fast_accum: bool = False) -> torch.Tensor:
    """bf16 (a_q * scale_a) @ (b_t * scale_b): a_q (M, K) row-major, b_t (K, N) column-major (a transposed
    row-major matrix), both e4m3. Same call on torch 2.11 and 2.13 (keyword scales; no amax output)."""
    return torch._scaled_mm(a_q, b_t, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accum)


def _grad_input(dy, w, ws, wt, ones, rowwise: bool, fast_accum: bool, quant=quantize):
    """dx = dy @ W for W = Wq * ws (rows): rowwise folds ws into dy; wt is Wq^T row-major (None: made now)."""
    if wt is None:
        wt = w.t().contiguous()  # "per-step": an FP8 transpose, no requantisation
    if rowwise:
        dq, ds = quant(dy, "rowwise", ws)
        return scaled_mm(dq, wt.t(), ds, ones, fast_accum)
    dq, ds = quant(dy, "tensorwise")
    return scaled_mm(dq, wt.t(), ds, ws, fast_accum)


class _FrozenFP8Matmul(torch.autograd.Function):
    """y = x W^T from a pre-quantised x; backward: dx = dy W in FP8. W is frozen: no weight gradient.

    Saves only the weight tensors (parameters/buffers, no copies): no activation is kept for backward.
    ``x`` is an input only so that autograd routes dy back to it; the GEMM reads (xq, xs).
    """

    @staticmethod
    def forward(ctx, x, xq, xs, w, ws, wt, ones, rowwise: bool, fast_fwd: bool, fast_bwd: bool):
        ctx.rowwise, ctx.fast_bwd = rowwise, fast_bwd
        ctx.save_for_backward(w, ws, wt, ones)  # None where absent: a fixed layout, unpacked as it is saved
        return scaled_mm(xq, w.t(), xs, ws, fast_fwd)

    @staticmethod
    def backward(ctx, dy):
        # Unpack by position, no list surgery: Dynamo (torch 2.11) cannot trace ``tuple.pop`` and broke the
        # graph at every FP8 linear's backward (11 breaks per decoder layer at batch 1; tests/test_fp8.py holds it)
        w, ws, wt, ones = ctx.saved_tensors
        dx = _grad_input(dy, w, ws, wt, ones, ctx.rowwise, ctx.fast_bwd) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None, None, None, None, None


class FP8Weight(nn.Module):
    """One frozen weight (N, K) in e4m3, quantised once from ``dense``; may hold several linears (``splits``).

    ``weight``: a frozen Parameter (so parameter counts stay those of the model); ``scale``: fp32 (1, N)
    rowwise, () tensorwise; ``weight_t``: Wq^T (K, N) row-major when ``weight_t="copy"``, else None;
    ``ones``: the (1, K) unit column scales of the rowwise input-gradient GEMM.
    """

    def __init__(self, dense: torch.Tensor, settings: FP8Settings, splits: tuple[int, ...] | None = None):
        super().__init__()
        n, k = dense.shape
        rowwise = settings.scaling == "rowwise"
        w_q, s = quantize(dense, settings.scaling)
        self.weight = nn.Parameter(w_q, requires_grad=False)
        self.register_buffer("scale", s.reshape(1, n).contiguous() if rowwise else s.reshape(()))
        self.register_buffer("weight_t", w_q.t().contiguous() if settings.weight_t == "copy" else None, persistent=False)
        self.register_buffer("ones", torch.ones(1, k, dtype=torch.float32, device=dense.device) if rowwise else None,
                             persistent=False)
        self.scaling, self.fast_accum_fwd, self.fast_accum_bwd = settings.scaling, settings.fast_accum_fwd, settings.fast_accum_bwd
        self.splits = tuple(splits) if splits else (n,)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, {self.scaling}, splits={self.splits}, W^T {'kept' if self.weight_t is not None else 'per step'}"


def fp8_matmul(x2: torch.Tensor, fw: FP8Weight, xq=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """x2 (M, K) @ W^T -> (M, N) bf16 with both autograd GEMMs in FP8. ``xq``: (x_q, scale) from ``quantize``
    when the caller shares one quantisation between GEMMs; ``rows``: only output rows [a, b) of a fused W
    (forward-capable slice for peft's per-module call, e.g. generation; its backward transposes per step)."""
    if xq is None:
        xq = quantize(x2, fw.scaling)
    rowwise = fw.scaling == "rowwise"
    w, ws, wt = fw.weight, fw.scale, fw.weight_t
    if rows is not None and rows != (0, w.shape[0]):
        a, b = rows
        w, ws, wt = w[a:b], (ws[:, a:b] if rowwise else ws), None
    return _FrozenFP8Matmul.apply(x2, xq[0], xq[1], w, ws, wt, fw.ones, rowwise, fw.fast_accum_fwd, fw.fast_accum_bwd)


class FP8Linear(nn.Module):
    """A bias-free frozen ``nn.Linear`` in FP8 (the ``base_layer`` of a peft LoRA layer, o_proj, the LM head).

    Owns its ``FP8Weight`` (``fw``), or is rows [a, b) of a fused one held by its attention/MLP module
    (kept out of the module tree, so it is not counted or moved twice).
    """

    def __init__(self, fw: FP8Weight, in_features: int, out_features: int, rows: tuple[int, int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if rows is None:
            self.fw = fw
        else:
            object.__setattr__(self, "_fused", fw)  # not a child module: the parent holds it
        self.rows = rows

    def weights(self) -> FP8Weight:
        return self.fw if self.rows is None else self._fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x.reshape(-1, x.shape[-1]), self.weights(), rows=self.rows)
        return y.view(*x.shape[:-1], y.shape[-1])

    def head_matmuls(self, quant=None):
        """(h -> h W^T, g -> g W) for ``loralab.fast``'s chunked cross-entropy, which computes the input
        gradient in its forward (so no autograd here). W^T is resolved once per call (per step)."""
        fw = self.weights()
        quant = quant or compiled_quantize()
        wt = fw.weight_t if fw.weight_t is not None else fw.weight.t().contiguous()
        rowwise = fw.scaling == "rowwise"

        def logits(h):
            hq, hs = quant(h, fw.scaling)
            return scaled_mm(hq, fw.weight.t(), hs, fw.scale, fw.fast_accum_fwd)

        def grad_input(g):
            return _grad_input(g, fw.weight, fw.scale, wt, fw.ones, rowwise, fw.fast_accum_bwd, quant)

        return logits, grad_input

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}" + (f", rows {self.rows} of a fused weight" if self.rows else "")


_COMPILED_QUANTIZE = None


def compiled_quantize():
    """``quantize`` compiled once (CUDA): outside the compiled decoder layers (the chunked loss runs eagerly)
    an eager cast is 5+ passes over a (chunk, V) fp32 tensor; compiled it is one reduction and one cast."""
    global _COMPILED_QUANTIZE
    if not torch.cuda.is_available():
        return quantize
    if _COMPILED_QUANTIZE is None:
        _COMPILED_QUANTIZE = torch.compile(quantize, dynamic=False)
    return _COMPILED_QUANTIZE


# ------------------------------------------------------------------ LoRA on top of an FP8 base

def _base(m: nn.Module) -> nn.Module:
    """A peft LoRA layer's base layer, or the module itself."""
    get = getattr(m, "get_base_layer", None)
    return get() if callable(get) else m


def lora_delta(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """peft's vanilla LoRA branch of layer ``m`` on input x: sum over active adapters of B(A(dropout(x))) * scaling
    (peft ``lora.Linear.forward``, the un-merged, no-variant case that ``convert_model`` checks for); None
    for a plain module or disabled adapters."""
    if not hasattr(m, "lora_A") or m.disable_adapters:
        return None
    out = None
    for name in m.active_adapters:
        if name not in m.lora_A.keys():
            continue
        a = m.lora_A[name]
        d = m.lora_B[name](a(m.lora_dropout[name](m._cast_input_dtype(x, a.weight.dtype)))) * m.scaling[name]
        out = d if out is None else out + d
    return out


def shared_input_outputs(x: torch.Tensor, mods, fused: FP8Weight | None) -> list[torch.Tensor]:
    """Outputs of the frozen linears ``mods`` (peft LoRA layers or FP8Linear) that all read x: one FP8 GEMM over
    the fused weight, or one per module from a single quantisation of x; each plus its LoRA branch."""
    x2 = x.reshape(-1, x.shape[-1])
    if fused is not None:
        ys = fp8_matmul(x2, fused).split(fused.splits, dim=-1)
    else:
        fws = [_base(m).weights() for m in mods]
        xq = quantize(x2, fws[0].scaling)  # once, for all of them
        ys = [fp8_matmul(x2, fw, xq) for fw in fws]
    outs = []
    for y, m in zip(ys, mods):
        y = y.view(*x.shape[:-1], y.shape[-1])
        d = lora_delta(m, x)
        outs.append(y if d is None else (y + d).to(y.dtype))  # peft adds in the adapter's dtype, returns the base's
    return outs


def _attention_interface(impl: str):
    """The attention kernel LlamaAttention.forward would call (its own lookup, transformers 5.x)."""
    return modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(impl, modeling_llama.eager_attention_forward)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """LlamaAttention.forward with q/k/v from one shared FP8 quantisation (fused or not). With a KV cache
    (generation) it is HF's own forward, through each projection's FP8 base layer."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = shared_input_outputs(hidden_states, (self.q_proj, self.k_proj, self.v_proj), getattr(self, "fp8_qkv", None))
    # Without a LoRA branch v is a column slice of the fused (T, Hq + 2 Hkv) output, and attention saves v for
    # backward: that would keep the whole buffer alive. A copy keeps Hkv (a no-op when v has LoRA; q and k
    # are not saved themselves, RoPE makes new tensors).
    v = v.contiguous()
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)  # looked up now: Liger may have patched it
    attn_output, attn_weights = _attention_interface(self.config._attn_implementation)(
        self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    """LlamaMLP.forward with gate/up from one shared FP8 quantisation (fused or not)."""
    g, u = shared_input_outputs(x, (self.gate_proj, self.up_proj), getattr(self, "fp8_gate_up", None))
    return self.down_proj(self.act_fn(g) * u)


# ------------------------------------------------------------------ converting a model

def _check_lora_layer(m: nn.Module, where: str) -> None:
    if getattr(m, "merged", False) or getattr(m, "lora_variant", None):
        raise ConfigError(f"fp8: {where} is a merged or DoRA/variant LoRA layer; expected plain, un-merged LoRA")


def _check_group(parent: nn.Module, names: tuple[str, ...], where: str) -> None:
    for n in names:
        m = getattr(parent, n)
        b = _base(m)
        _check_lora_layer(m, f"{where}.{n}")
        if type(b) is not nn.Linear or b.bias is not None:
            raise ConfigError(f"fp8: {where}.{n} is {type(b).__name__}{' with a bias' if getattr(b, 'bias', None) is not None else ''}; "
                              "expected a bias-free nn.Linear (quantization='none')")


def _convert_group(parent: nn.Module, names: tuple[str, ...], fused_attr: str | None, settings: FP8Settings, where: str) -> int:
    """Swap the frozen linears ``names`` of ``parent`` (bare or under peft LoRA) for FP8 ones; returns how many."""
    _check_group(parent, names, where)
    mods = [getattr(parent, n) for n in names]
    bases = [_base(m) for m in mods]
    if fused_attr:
        dense = torch.cat([b.weight.detach() for b in bases])
        fw = FP8Weight(dense, settings, splits=tuple(b.out_features for b in bases))
        del dense
        setattr(parent, fused_attr, fw)
        start = 0
        news = []
        for b in bases:
            news.append(FP8Linear(fw, b.in_features, b.out_features, rows=(start, start + b.out_features)))
            start += b.out_features
    else:
        news = [FP8Linear(FP8Weight(b.weight.detach(), settings), b.in_features, b.out_features) for b in bases]
    for n, m, new in zip(names, mods, news):
        if m is _base(m):
            setattr(parent, n, new)
        else:
            m.base_layer = new  # the peft LoRA layer keeps its adapters; its bf16 base is dropped
    return len(names)


def convert_model(model, settings: FP8Settings) -> dict[str, Any]:
    """Quantise every decoder layer's q/k/v/o/gate/up/down (and the LM head if asked) to FP8 in place; frees
    the bf16 weights. No device check (the numerics run on CPU too): ``apply_fp8`` is the guarded entry."""
    from loralab.fast import base_causal_lm

    lm = base_causal_lm(model)
    fused = settings.fused
    groups = []  # (parent, names, fused attribute, where): all checked before anything is converted
    for i, layer in enumerate(lm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups += [(attn, ("q_proj", "k_proj", "v_proj"), "fp8_qkv" if fused else None, f"layers.{i}.self_attn"),
                   (attn, ("o_proj",), None, f"layers.{i}.self_attn"),
                   (mlp, ("gate_proj", "up_proj"), "fp8_gate_up" if fused else None, f"layers.{i}.mlp"),
                   (mlp, ("down_proj",), None, f"layers.{i}.mlp")]
    if settings.lm_head:
        if lm.lm_head.weight is lm.get_input_embeddings().weight:
            raise ConfigError("fp8_lm_head=True: the LM head is tied to the input embeddings; expected fp8_lm_head=False")
        groups.append((lm, ("lm_head",), None, "lm_head"))
    for parent, names, _, where in groups:
        _check_group(parent, names, where)
    n = sum(_convert_group(parent, names, attr, settings, where) for parent, names, attr, where in groups)
    if settings.fused or settings.shared_quant:  # else: peft's/HF's own forwards, each GEMM quantising its input
        for layer in lm.model.layers:
            layer.self_attn.forward = types.MethodType(_attention_forward, layer.self_attn)
            layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
    fp8_bytes = sum(t.numel() * t.element_size() for m in lm.modules() if isinstance(m, FP8Weight)
                    for t in (m.weight, m.scale, m.weight_t, m.ones) if t is not None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed bf16 weights back: reserved memory then reflects the FP8 model
    info = {"linears": n, "fp8_bytes": fp8_bytes, "settings": dataclasses.asdict(settings)}
    lm._loralab_fp8 = info
    return info


# ------------------------------------------------------------------ the guarded entry point

def fp8_status(device: torch.device) -> tuple[bool, str]:
    """(usable, what this device is): FP8 tensor cores need CUDA compute capability 8.9+."""
    if device.type != "cuda":
        return False, device.type
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} without FP8 matmuls"
    cap = torch.cuda.get_device_capability(device)
    what = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    return cap >= FP8_CC, what


def check_device(device: torch.device, settings: FP8Settings, recipe_name: str = "fast8") -> str:
    """Raise ConfigError (one line, naming ``fast``) unless this device runs FP8 GEMMs with this scaling; returns
    the device description. The probe catches a torch/GPU pair without the rowwise kernel (e.g. some sm_89)."""
    ok, what = fp8_status(device)
    if not ok:
        raise ConfigError(f"recipe {recipe_name}: needs a GPU with FP8 tensor cores (compute capability 8.9+, "
                          f"e.g. H100/H200/L40S/RTX 4090); this is {what}. Use --recipe fast.")
    try:
        fw = FP8Weight(torch.randn(32, 32, device=device), settings)
        fp8_matmul(torch.randn(16, 32, device=device, dtype=torch.bfloat16), fw)
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:200]
        raise ConfigError(f"recipe {recipe_name}: torch {torch.__version__} cannot run {settings.scaling} FP8 matmuls "
                          f"on {what} ({msg}). Use --recipe fast.") from e
    return what


def apply_fp8(model, recipe, device: torch.device | None = None) -> str:
    """The recipe's FP8 base (``Recipe.fp8`` != "off") on a PeftModel; returns the lever's status line."""
    if device is None:
        device = next(model.parameters()).device
    settings = FP8Settings.of(recipe)
    check_device(device, settings, recipe.name)
    info = convert_model(model, settings)
    return f"{settings.describe()}: {info['linears']} linears, {info['fp8_bytes'] / 2**30:.2f} GiB"


# ------------------------------------------------------------------ memory terms (for loralab.memory)

def linear_weight_bytes(n_in: int, n_out: int, scaling: str = "rowwise", weight_t: str = "copy") -> int:
    """Bytes of one frozen FP8 weight (n_out x n_in; a fused group counts as one): 1 B per weight (e4m3),
    +1 B per weight for the kept W^T (``weight_t="copy"``), + fp32 scales: rowwise one per output channel
    and the (1, n_in) unit vector of the input-gradient GEMM, tensorwise one."""
    b = n_in * n_out * (2 if weight_t == "copy" else 1)
    return b + (4 * (n_out + n_in) if scaling == "rowwise" else 4)


def _groups(s, settings: FP8Settings) -> list[tuple[int, int]]:
    """(n_in, n_out) of each FP8 weight of one decoder layer (``s``: loralab.shape.ModelShape)."""
    lin = s.linears()
    if settings.fused:
        return [(s.H, s.Hq + 2 * s.Hkv), lin["o_proj"], (s.H, 2 * s.I), lin["down_proj"]]
    return list(lin.values())


def weight_terms(model_config, recipe) -> dict[str, tuple[int, str]]:
    """Frozen base weights of an FP8 recipe, {name: (bytes, source)}, the form of ``loralab.memory.weight_terms``."""
    from loralab.shape import ModelShape as Shape

    s = Shape.of(model_config)
    st = FP8Settings.of(recipe)
    layer = sum(linear_weight_bytes(i, o, st.scaling, st.weight_t) for i, o in _groups(s, st))
    n_lin = s.L * s.layer_linear_params()
    out = {"weights_fp8_linear": (s.L * layer, f"{n_lin:,} linear weights x {2 if st.weight_t == 'copy' else 1} B "
                                              f"(e4m3{' + kept W^T' if st.weight_t == 'copy' else ''}) + fp32 {st.scaling} scales")}
    head_fp8 = st.lm_head and not s.tied
    n_other = s.V * s.H * (1 if s.tied or head_fp8 else 2) + (2 * s.L + 1) * s.H
    out["weights_embed_head_norms"] = (2 * n_other, f"embeddings{'' if head_fp8 else ' + LM head'} + norms = {n_other:,} x 2 B (bf16)")
    if head_fp8:
        out["weights_lm_head_fp8"] = (linear_weight_bytes(s.H, s.V, st.scaling, st.weight_t), f"LM head {s.V} x {s.H} in e4m3")
    return out


def layer_saved_bytes_per_token(model_config, recipe, seq_len: int, device: str = "cuda") -> float:
    """Bytes one FP8 decoder layer keeps for backward per token: exactly what the bf16 layer keeps.

    Derivation: a frozen linear's backward ``dx = dy W`` needs W, not x, so ``_FrozenFP8Matmul`` saves only
    the weight tensors (parameters/buffers: no new memory); the FP8 copies of x (and their scales) are
    consumed by the forward GEMM and freed; everything else (norm1's output for LoRA A, q/k/v after RoPE,
    SDPA's output and logsumexp, the gate/up outputs for SiLU's backward, the LoRA A outputs, the RMSNorm
    inputs/rsqrt) is the same graph as bf16. Fused q/k/v and gate/up change no byte count: the partitioner
    saves the (T, 2I) gate/up output instead of two (T, I) halves. Checked on CPU by
    tests/test_fp8.py (saved-tensor hooks, eager; the compiled forward graph's saved outputs).
    """
    from loralab.memory import layer_saved_bytes_per_token as bf16_layer

    return bf16_layer(model_config, recipe.replace(fp8="off"), seq_len, device)


def backward_transient_bytes(model_config, recipe, tokens: int) -> int:
    """Largest extra memory an FP8 layer's backward holds over the bf16 layer's, bytes: the e4m3 copy of the
    widest output gradient (gate/up: 2 I per token fused, I unfused) + its per-token fp32 scales, plus with
    ``fp8_weight_t="per-step"`` that GEMM's transposed weight (2 I x H fused). Compiled: dy * s_w is not
    materialised in fp32 (it is fused into the cast)."""
    from loralab.shape import ModelShape as Shape

    s = Shape.of(model_config)
    st = FP8Settings.of(recipe)
    widest_in, widest_out = max(_groups(s, st), key=lambda g: g[1])
    b = tokens * (widest_out + 4)
    if st.weight_t == "per-step":
        b += widest_in * widest_out
    return b
