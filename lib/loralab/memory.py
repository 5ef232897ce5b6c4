"""Memory math that predicts: peak GPU memory of one LoRA training step, term by term.

From a model config (``transformers.LlamaConfig``), a recipe (``loralab.config.Recipe``),
a batch size ``B`` and a sequence length ``S`` this module predicts the peak memory of a
training step (forward, backward, AdamW step) as a breakdown of named terms, each with the
formula and where it comes from, the way nanoGPT writes out its MFU formula.

Notation (all sizes in bytes; ``T = B * S`` tokens in the step):
  H hidden, I intermediate (MLP), L layers, V vocab, nh heads, nkv key/value heads,
  hd = H / nh, Hq = nh * hd, Hkv = nkv * hd, r LoRA rank.
  a = bytes of one element of the residual stream ("activation dtype"):
      4 when the non-quantized parameters are fp32 (the ``seed`` recipe, and every recipe
      that runs peft's ``prepare_model_for_kbit_training``, which casts them to fp32),
      else bytes(param_dtype). bitsandbytes returns its matmul outputs in the input's dtype
      (``MatMul8bitLt``: ``int8_scaled_mm(..., dtype=A.dtype)``; ``Linear4bit``:
      ``.to(inp_dtype)``), so a quantized base does not change ``a``.

Where the activation terms come from (transformers 5 ``modeling_llama.py``, read line by line;
"saved" means kept by autograd for backward, deduplicated by storage):
  LlamaRMSNorm     x.to(fp32) (saved by pow and mul: 4H, the input itself when a = 4),
                   x*rsqrt (saved by weight*h: aH), rsqrt (4 bytes/token).
  nn.Linear        saves its input.  bnb ``MatMul8bitLt`` keeps ``A`` (its input) in
                   ``ctx.tensors``.  bnb ``MatMul4Bit`` keeps only the packed weight: an nf4
                   base linear saves no activation.
  peft LoRA        dropout(x) -> lora_A -> lora_B: CUDA dropout saves a bool mask (1 byte per
                   element; CPU saves a noise tensor of x's dtype), lora_A saves the dropout
                   output (adapter dtype, fp32 under peft's ``autocast_adapter_dtype``),
                   lora_B saves lora_A's output (r per token).
  RoPE             q*cos and rotate_half(q)*sin save q and rotate_half(q); the same for k.
  eager attention  matmul(q, k^T) saves q_embed, k_embed; softmax(dtype=fp32) saves its fp32
                   output (4 * nh * S per token); when a = 2 the ``.to(query.dtype)`` copy is
                   saved by matmul(probs, v) too (2 * nh * S); v is saved; dropout p = 0 is
                   the identity.  The 4-D additive mask (B, 1, S, S) of dtype a is built once
                   per forward and held all step.
  SDPA             saves q, k, v, its output and the fp32 logsumexp (4 * nh per token); no
                   S x S tensor, no mask (``is_causal``).
  attention out    transpose(1, 2).contiguous(): a copy of aHq, saved by o_proj.
  LlamaMLP         gate -> SiLU (saves g), up, s*u (saves s and u), down (saves p = s*u):
                   4 * aI.
  LM head + loss   logits (V per token, lm_head dtype), ``ForCausalLMLoss``: logits.float()
                   (a copy when logits are not fp32), cross_entropy = log_softmax (saves its
                   fp32 output, 4V) + nll_loss.  In backward nll_loss allocates the dense
                   grad (4V) and log_softmax's backward a new grad of the logits (4V): with the
                   saved output that is 12V per token at once.  Labels are shifted by padding
                   (transformers >= 4.5x), so no shifted-logits copy.  The training loop drops
                   ``outputs`` (and the logits) before backward (``loralab.train``).
  chunked CE       (``cross_entropy="chunked"``, loralab.fast): the LM head and the loss run over chunks of
                   c = ``ce_chunk_tokens`` tokens and the gradient of the hidden states is computed in the
                   forward. Alive at the loss: the final norm's output (aH per token, the chunks' input),
                   that gradient (aH per token, kept for backward), and one chunk's logits: bf16 matmul
                   output + its fp32 copy, then the fp32 softmax + its bf16 copy (6 V bytes per chunk token).
                   No T x V tensor is ever alive; backward scales the stored gradient (a second aH).

Gradient checkpointing (``loralab.model.enable_checkpointing``: reentrant, as the study):
  each decoder layer keeps only its input (aH per token); in backward the top layer is
  recomputed and differentiated while all L checkpoints are alive. The step's peak is then
  the largest of: (a) the loss forward, (b) the loss backward, (c) the backward of the top
  layer (its recomputed activations plus the gradients in flight).  With non-reentrant
  checkpointing a bnb int8 layer leaks its inputs (kept in ``ctx.tensors``, which the
  checkpoint's saved-tensor hooks cannot see): 3aH + aI per token per layer.

Reserved vs allocated depends on the allocator mode (``Recipe.allocator``, loralab.allocator):

* "expandable" (loralab's recipes; expandable_segments:True): reserved = allocated peak +
  EXPANDABLE_LOSS_FRACTION x the loss-backward blocks + EXPANDABLE_FIXED_GIB. Under an allocator cap the
  allocator unmaps free pages and retries, so ``info["reserved_under_cap"]`` = allocated + the fixed part.
* "caching" (PyTorch's default; ``seed``, as the study ran): reserved = allocated peak + FRAG_LOSS_FRACTION x
  the loss-backward blocks + FRAG_LAYER_FRACTION x the top layer's backward working set + ALLOCATOR_FIXED_GIB.
  Under a cap the loss part counts only when the peak is in the layers' backward (wholly free cached segments
  are released and the allocation retried).

Calibration: the constants below are physical terms with one value for every recipe and batch size, each set
calibrated once on a GPU sweep (``CALIBRATION``, ``EXPANDABLE_CALIBRATION``). ``benchmarks/memory_model_check.py``
compares the current model with the committed measurements (benchmarks/results/memory_model_check_*.md).

Not modelled: Liger's kernels (``liger`` on, or its fused linear cross-entropy): ``predict_peak`` says so
(ConfigError) instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from loralab.config import ConfigError, Recipe
from loralab.shape import ModelShape

GIB = 2**30
GB = 10**9

# --- calibration constants (documented; calibrate once on the GPU) -------------------------
CUDA_CONTEXT_GIB = 0.5
"""CUDA context + kernel images + cuBLAS/cuDNN handles of a process on an H100/H200 class GPU with
torch 2.x: device memory used that PyTorch's allocator does not see (nvidia-smi minus
torch.cuda.memory_reserved). Counts against a real card, not against an allocator cap set with
torch.cuda.set_per_process_memory_fraction."""
ALLOCATOR_FIXED_GIB = 0.56
"""Fixed allocator-visible extras: cuBLAS workspaces (``:4096:8`` = 32 MiB per handle on Hopper), rounding
of every segment to 2 MiB (>1 MiB requests) and of 1-10 MiB requests to 20 MiB segments
(c10/cuda/CUDACachingAllocator.cpp: kRoundLarge, kLargeBuffer), small buffers. Calibrated once (see below)."""
FRAG_LOSS_FRACTION = 0.35
"""Caching-allocator fragmentation from the loss blocks: the loss allocates T x V fp32 blocks (logits copy,
log-softmax output, its grad, the logits' grad: 12 V bytes per token at the loss backward) and frees them
before the decoder layers' backward; their segments stay cached (torch.cuda.memory_reserved) and are split
by the layers' smaller tensors, so they cannot be handed back or merged. Reserved grows by this fraction of
the loss-backward bytes. Calibrated once on the H200 sweep (see CALIBRATION)."""
FRAG_LAYER_FRACTION = 0.19
"""Fragmentation from the per-layer working set of the backward: each decoder layer's backward (the
recomputed activations under checkpointing, plus the gradients in flight) allocates and frees blocks of
B x S x {H, I, nh*S} elements; the checkpoints and gradients that survive a layer pin parts of those
segments, so the next layer's blocks of the same size need new segments. Reserved grows by this fraction of
the top layer's backward working set. Calibrated once on the H200 sweep (see CALIBRATION)."""
CALIBRATION = ("benchmarks/results/memory_sweep_H200_20261130.json: 25 rows (seed, seed-sdpa, qlora, "
               "lora-bf16-ckpt, lora-bf16 x bs 1,2,4,8,16, seq 2048, H200, torch 2.11, transformers 5.17); "
               "FRAG_LOSS_FRACTION, FRAG_LAYER_FRACTION, ALLOCATOR_FIXED_GIB chosen once to minimise the largest "
               "|predicted/measured reserved - 1| over all 25 rows (grid 0.01/0.005/0.02), same for every recipe and batch")
EXPANDABLE_FIXED_GIB = 0.22
"""Reserved - allocated with ``Recipe.allocator = "expandable"`` (expandable_segments:True) that does not grow
with the batch: cuBLAS workspaces, 2 MiB page rounding, the small-block pool. Calibrated once (see
EXPANDABLE_CALIBRATION)."""
EXPANDABLE_LOSS_FRACTION = 0.17
"""With expandable segments the per-layer fragmentation is gone (freed pages are reused wherever they lie), but a
block still needs a contiguous virtual range: the T x V fp32 loss blocks, freed before the layers' backward, leave
mapped pages that the smaller blocks after them do not fill. H200, uncapped: reserved - allocated grew by ~0.2
GiB per 2048-token sequence for lora-bf16(-ckpt), whose loss-backward blocks are 0.73 GiB per sequence. Under an
allocator cap the allocator unmaps free pages and retries, so ``reserved_under_cap`` leaves this term out.
Calibrated once (see EXPANDABLE_CALIBRATION)."""
EXPANDABLE_CALIBRATION = ("benchmarks/results/memory_sweep_H200_20261130-1219_expandable.json: 15 rows (qlora, "
                          "lora-bf16-ckpt, lora-bf16 x bs 1,2,4,8,16, seq 2048, 2 steps, H200, torch 2.11); "
                          "EXPANDABLE_FIXED_GIB and EXPANDABLE_LOSS_FRACTION chosen once to minimise the largest "
                          "|predicted/measured reserved - 1| (grid 0.02/0.01): 2.8 %")
DROPOUT_MASK_BYTES_CUDA = 1
"""``native_dropout`` (CUDA) saves a bool mask: 1 byte per element."""

INT8_OUTLIER_COL_FRACTION_DOWN = 1.0
"""Fraction of down_proj input columns bitsandbytes treats as outliers (|x| >= 6, threshold 6.0):
their fp32 slice ``subA = A[:, outlier_cols]`` is kept for backward. With random weights the
input silu(g) * u has heavy tails and nearly every column has an outlier over B*S rows (1.0);
with trained Llama weights only a few columns do (~0). Calibrate on the GPU."""

INT8_CTX_KEPT = ("norm2.out", "attn_out.contiguous", "mlp.prod", "mlp.down_outlier_cols")
"""Saved inputs of bnb int8 linears after the attention core (o_proj, gate/up, down_proj): kept in
MatMul8bitLt's ``ctx.tensors`` until the recomputed layer's graph is freed (see _layer_backward_peak)."""
EAGER_EXTRA_SCORE_BUFFERS_CUDA = 1
"""Score-sized (B x nh x S x S) fp32 buffers live at the eager softmax backward on CUDA beyond the three
the autograd graph explains (saved probs, grad of probs, grad of scores; three is what a CPU run shows,
tests/test_memory.py). Calibrated on the H200 (torch 2.11, transformers 5.17): the seed rows' slope of
max_memory_allocated is 3.545 GiB per 2048-token sequence; with 3 buffers the model gives 3.05, with 4
3.55. The OOM message of bs 8 under a 40 GiB cap agrees: the peak's last request is one 4.00 GiB score
buffer (8 x 32 x 2048^2 x 4 B) on top of 31.44 GiB. Which kernel holds it was not identified."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
NF4_BLOCK = 64
"""bitsandbytes 4-bit: one absmax per 64 weights."""
NF4_DQ_BLOCK = 256
"""Double quantization: the absmaxes are quantized to 8 bits in blocks of 256, one fp32 each."""
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
"""AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW) keeps exp_avg and exp_avg_sq per parameter."""


# --- the breakdown -----------------------------------------------------------------------------
@dataclass
class MemoryBreakdown:
    """Predicted peak memory as named terms in bytes, each with its formula and source."""

    terms: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    phase: str = ""
    """The moment of the step where the peak happens."""
    context_terms: tuple[str, ...] = ("cuda_context",)
    """Terms the PyTorch allocator does not see (device memory outside memory_reserved)."""
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, nbytes: float, source: str) -> None:
        self.terms[name] = self.terms.get(name, 0) + int(round(nbytes))
        self.sources[name] = source

    @property
    def total(self) -> int:
        """Device memory used at the peak (what nvidia-smi shows), bytes."""
        return sum(self.terms.values())

    @property
    def reserved(self) -> int:
        """What torch.cuda.max_memory_reserved should show (total minus the CUDA context), bytes."""
        return self.total - sum(self.terms.get(t, 0) for t in self.context_terms)

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should show, bytes."""
        return self.reserved - self.terms.get("allocator_overhead", 0)

    def need(self, allocator_cap: bool) -> float:
        """Bytes that must fit: under an allocator cap (``--gpu-memory-gib``) the reserved peak as the capped
        allocator keeps it (``info["reserved_under_cap"]``); on a whole card, device memory (``total``)."""
        return self.info["reserved_under_cap"] if allocator_cap else self.total

    def gib(self, name: str | None = None) -> float:
        return (self.total if name is None else self.terms.get(name, 0)) / GIB

    def to_gib(self) -> list[dict[str, Any]]:
        """Rows (term, GiB, source) plus totals: ``pandas.DataFrame(bd.to_gib())`` is the table."""
        rows = [{"term": k, "GiB": v / GIB, "source": self.sources.get(k, "")} for k, v in self.terms.items()]
        rows.append({"term": "allocated (torch max_memory_allocated)", "GiB": self.allocated / GIB, "source": "sum of the terms above minus allocator overhead and context"})
        rows.append({"term": "reserved (torch max_memory_reserved)", "GiB": self.reserved / GIB, "source": "total minus CUDA context"})
        rows.append({"term": "total (device used)", "GiB": self.total / GIB, "source": f"peak at: {self.phase}"})
        return rows

    def markdown(self) -> str:
        lines = ["| term | GiB | source |", "| --- | ---: | --- |"]
        lines += [f"| {r['term']} | {r['GiB']:.3f} | {r['source']} |" for r in self.to_gib()]
        return "\n".join(lines)


# --- weights ---------------------------------------------------------------------------------
def _unquantized_bytes(recipe: Recipe) -> int:
    """Bytes of each parameter that is not a quantized linear (embeddings, norms, LM head)."""
    if recipe.quantization != "none" and recipe.prepare_for_kbit:
        return 4  # peft prepare_model_for_kbit_training: fp16/bf16 params -> fp32
    return DTYPE_BYTES[recipe.param_dtype]


def activation_bytes(recipe: Recipe) -> int:
    """``a``: element size of the residual stream (embedding output dtype)."""
    return _unquantized_bytes(recipe)


def weight_terms(model_config, recipe: Recipe) -> dict[str, tuple[int, str]]:
    """Frozen base weights: {name: (bytes, source)}. An FP8 base (``recipe.fp8``): ``loralab.fp8.weight_terms``."""
    if recipe.fp8 != "off":
        from loralab import fp8

        return fp8.weight_terms(model_config, recipe)
    s = ModelShape.of(model_config)
    n_lin = s.L * s.layer_linear_params()
    n_rows = s.L * sum(o for _, o in s.linears().values())  # output features: one scale each
    n_blocks = -(-n_lin // NF4_BLOCK)
    u = _unquantized_bytes(recipe)
    n_other = s.V * s.H * (1 if s.tied else 2) + (2 * s.L + 1) * s.H
    out: dict[str, tuple[int, str]] = {}
    if recipe.quantization == "int8":
        out["weights_int8"] = (n_lin + 4 * n_rows, f"{n_lin:,} linear weights x 1 B (CB) + {n_rows:,} fp32 row scales (SCB); bitsandbytes Int8Params")
    elif recipe.quantization == "nf4":
        b = n_lin // 2 + n_blocks + 4 * -(-n_blocks // NF4_DQ_BLOCK)
        out["weights_nf4"] = (b, f"{n_lin:,} x 0.5 B + absmax 1 B per {NF4_BLOCK} (double quant) + fp32 per {NF4_DQ_BLOCK} blocks (Dettmers et al. 2023)")
    else:
        out["weights_linear"] = (n_lin * u, f"{n_lin:,} linear weights x {u} B ({recipe.param_dtype})")
    why = "fp32: peft prepare_model_for_kbit_training casts them" if (recipe.quantization != "none" and recipe.prepare_for_kbit) else recipe.param_dtype
    out["weights_embed_head_norms"] = (n_other * u, f"embeddings + LM head (not quantized: bnb skips lm_head) + norms = {n_other:,} x {u} B ({why})")
    return out


def weights_bytes(model_config, recipe: Recipe) -> int:
    return sum(b for b, _ in weight_terms(model_config, recipe).values())


# --- activations: per-token bytes of one decoder layer ----------------------------------------
def _layer_saved(s: ModelShape, recipe: Recipe, S: int, device: str) -> dict[str, dict[str, float]]:
    """Saved tensors of one decoder layer, per token, grouped by the backward phase that frees them.

    Keys are tensor names: one tensor saved by two ops is one key (memory is shared).
    Returns {"mlp": {...}, "norm2": {...}, "attn_out": {...}, "attn": {...}, "qkv": {...}}; the order
    is the backward order (MLP first). ``layer_input`` (the first norm's fp32 view of the input) is in
    "qkv" and is the checkpoint itself when a = 4.
    """
    a = activation_bytes(recipe)
    # LoRA matmul dtype: peft get_peft_model(autocast_adapter_dtype=True) keeps adapters fp32 and casts
    # the input to fp32 (a T x d_in copy); loralab.fast's lora_matmul_dtype="input" casts the adapter
    # weights to the input's dtype instead (no copy).
    la = a if recipe.lora_matmul_dtype == "input" else 4
    if _compiled(recipe, device):
        return _layer_saved_compiled(s, recipe, device)
    # A frozen nn.Linear needs only W for grad_input: it saves no activation. bnb MatMul8bitLt keeps
    # its input A in ctx.tensors anyway; MatMul4Bit keeps only the packed weight.
    base_saves = recipe.quantization == "int8"
    mask_b = DROPOUT_MASK_BYTES_CUDA if device == "cuda" else la
    r, H, I = recipe.lora_r, s.H, s.I
    lin = s.linears()
    g = {k: {} for k in ("mlp", "norm2", "attn_out", "attn", "qkv")}

    def _keep(group: dict, name: str, nbytes: float) -> None:
        if not any(name in grp for grp in g.values()):
            group[name] = nbytes

    def lora(group: dict, target: str, inp: str, inp_bytes: float) -> None:
        if target not in recipe.lora_targets:
            return
        d_in = lin[target][0]
        if recipe.lora_dropout > 0:
            group[f"{target}.dropout_mask"] = mask_b * d_in
            group[f"{target}.dropout_out"] = la * d_in
        else:  # nn.Identity; lora_A saves x cast to the adapter dtype (a copy when a != 4)
            if a == la:
                _keep(group, inp, inp_bytes)
            else:
                group[f"{target}.x_cast"] = la * d_in
        group[f"{target}.lora_A_out"] = la * r

    # first RMSNorm + q/k/v + RoPE + attention core (freed last)
    q = g["qkv"]
    q["layer_input_fp32"] = 4 * H
    q["norm1.rsqrt"] = 4
    if base_saves:
        q["norm1.out"] = a * H
    for t in ("q_proj", "k_proj", "v_proj"):
        lora(q, t, "norm1.out", a * H)
    at = g["attn"]
    n_rep = s.nh // s.nkv
    q["attn.q_embed"] = a * s.Hq
    q["attn.k_embed"] = a * (s.Hq if n_rep > 1 else s.Hkv)  # repeat_kv copy when GQA
    at["attn.v"] = a * (s.Hq if n_rep > 1 else s.Hkv)
    if recipe.attn_implementation == "eager":
        q["attn.softmax_fp32"] = 4 * s.nh * S
        if a != 4:
            at["attn.probs_cast"] = a * s.nh * S
    else:
        at["attn.sdpa_out"] = a * s.Hq
        q["attn.sdpa_lse"] = 4 * s.nh
    o = g["attn_out"]
    if base_saves:
        o["attn_out.contiguous"] = a * s.Hq
    lora(o, "o_proj", "attn_out.contiguous", a * s.Hq)
    n2 = g["norm2"]
    n2["norm2.input_fp32"] = 4 * H
    n2["norm2.rsqrt"] = 4
    if base_saves:
        n2["norm2.out"] = a * H
    m = g["mlp"]
    m["mlp.gate_out"] = a * I
    m["mlp.silu_out"] = a * I
    m["mlp.up_out"] = a * I
    if base_saves:
        m["mlp.prod"] = a * I
    for t in ("gate_proj", "up_proj"):
        lora(m, t, "norm2.out", a * H)
    lora(m, "down_proj", "mlp.prod", a * I)
    if recipe.quantization == "int8":
        m["mlp.down_outlier_cols"] = a * I * INT8_OUTLIER_COL_FRACTION_DOWN
    return g


def _compiled(recipe: Recipe, device: str) -> bool:
    """loralab.fast: compile="on", or "auto" on CUDA (regional torch.compile of each decoder layer)."""
    return recipe.compile == "on" or (recipe.compile == "auto" and device == "cuda")


def _layer_saved_compiled(s: ModelShape, recipe: Recipe, device: str) -> dict[str, dict[str, float]]:
    """Saved tensors per token of one ``torch.compile``-d decoder layer (loralab.fast, regional compile).

    Inductor's min-cut partitioner (torch._functorch.partitioners.min_cut_rematerialization_partition)
    saves the outputs of ops it will not recompute (matmuls, SDPA) and the layer input, and recomputes the
    pointwise ops (RMSNorm, RoPE, SiLU, the residual adds, casts) in backward. Per token, a = activation bytes:
      layer input x (aH), norm1 output = LoRA A's input (aH), q, k, v after RoPE = SDPA's inputs (a(Hq+2Hkv)),
      SDPA output (aHq) + fp32 logsumexp (4 nh), the residual after attention (aH, norm2's input),
      gate and up outputs (2 aI: SiLU and the product need both; the frozen down_proj needs no input),
      LoRA A outputs (r per adapted module), RMSNorm rsqrt (4 B each).
    Checked on the H200: lora-bf16 (compile on, bf16, LoRA q/v, no dropout) saves 7 aH + 2 aI per token
    per layer = 101,376 B vs 102,0xx B measured (slope of max_memory_allocated over bs 1..16 minus the loss).
    """
    a = activation_bytes(recipe)
    H, I = s.H, s.I
    g = {k: {} for k in ("mlp", "norm2", "attn_out", "attn", "qkv")}
    g["qkv"].update({"layer_input": a * H, "norm1.rsqrt": 4, "norm1.out": a * H,
                     "attn.q_embed": a * s.Hq, "attn.k_embed": a * s.Hkv, "attn.sdpa_lse": 4 * s.nh})
    g["attn"].update({"attn.v": a * s.Hkv, "attn.sdpa_out": a * s.Hq})
    g["norm2"].update({"residual_after_attn": a * H, "norm2.rsqrt": 4})
    g["mlp"].update({"mlp.gate_out": a * I, "mlp.up_out": a * I})
    for t in recipe.lora_targets:
        grp = g["mlp"] if t in ("gate_proj", "up_proj", "down_proj") else g["qkv"]
        grp[f"{t}.lora_A_out"] = a * recipe.lora_r
        if recipe.lora_dropout > 0:
            d_in = s.linears()[t][0]
            grp[f"{t}.dropout_mask"] = (DROPOUT_MASK_BYTES_CUDA if device == "cuda" else a) * d_in
            grp[f"{t}.dropout_out"] = a * d_in
    return g


def _sum(d: dict[str, float]) -> float:
    return float(sum(d.values()))


def layer_saved_bytes_per_token(model_config, recipe: Recipe, seq_len: int, device: str = "cuda") -> float:
    """Bytes autograd keeps per token for one decoder layer without checkpointing (includes its input)."""
    g = _layer_saved(ModelShape.of(model_config), recipe, seq_len, device)
    return sum(_sum(v) for v in g.values())


def _dequant_transient(s: ModelShape, recipe: Recipe) -> int:
    """Largest weight copy made in a base linear's backward (absolute bytes).
    int8: ``CB.to(dtype_A, copy=True)`` (fp32 under the seed recipe); nf4: dequantize_4bit in compute dtype."""
    big = max(i * o for i, o in s.linears().values())
    if recipe.quantization == "int8":
        return big * activation_bytes(recipe)
    if recipe.quantization == "nf4":
        return big * DTYPE_BYTES[recipe.compute_dtype]
    return 0


def _fp8_transient(model_config, recipe: Recipe, tokens: int) -> int:
    """An FP8 base's extra backward memory (the e4m3 output gradient, a per-step W^T): ``loralab.fp8``."""
    if recipe.fp8 == "off":
        return 0
    from loralab import fp8

    return fp8.backward_transient_bytes(model_config, recipe, tokens)


def _layer_backward_peak(s: ModelShape, recipe: Recipe, S: int, device: str, ckpt_shared: float) -> tuple[float, str]:
    """Per-token bytes of the top layer at the worst moment of its backward (saved + grads in flight),
    minus ``ckpt_shared`` (the part of its saved input that is the checkpoint itself)."""
    a = activation_bytes(recipe)
    g = _layer_saved(s, recipe, S, device)
    full = sum(_sum(v) for v in g.values()) - ckpt_shared
    grad_stream = 2 * a * s.H  # grad of the layer output + grad of the residual branch being built
    # MLP: down_proj backward gives grad_p (aI); mul backward then holds grad_p, grad_s, grad_u (3aI)
    prod = g["mlp"].get("mlp.prod", 0.0)
    mlp = full + grad_stream + max(a * s.I, 3 * a * s.I - prod)
    # attention core: MLP, norm2, o_proj input and v already freed
    left = full - _sum(g["mlp"]) - _sum(g["norm2"]) - _sum(g["attn_out"]) - _sum(g["attn"])
    if recipe.quantization == "int8":
        # bitsandbytes MatMul8bitLt keeps (CAt, subA, A) in ``ctx.tensors``, a plain attribute, not
        # ``save_for_backward``: the engine's release_variables() does not free them after the node runs.
        # They live as long as the node, i.e. until the recomputed layer's whole graph is dropped at the
        # end of the checkpoint's backward: the inputs of o_proj, gate/up and down_proj (and down_proj's
        # outlier slice) are still alive during the attention backward.
        left += sum(v for grp in (g["mlp"], g["norm2"], g["attn_out"]) for k, v in grp.items()
                    if k in INT8_CTX_KEPT)
    if recipe.attn_implementation == "eager":
        # softmax backward: saved fp32 probs + grad of probs (fp32) + grad of scores (fp32) [3 on CPU,
        # measured with tests/memtrack.py] + EAGER_EXTRA_SCORE_BUFFERS_CUDA more on CUDA (H200 measurement)
        extra = EAGER_EXTRA_SCORE_BUFFERS_CUDA if device == "cuda" else 0
        attn = left + grad_stream + a * s.Hkv + (8 + 4 * extra) * s.nh * S
    else:
        # SDPA backward: q,k,v,out,lse saved + dq, dk, dv + fp32 dq accumulator
        attn = left + _sum(g["attn"]) + grad_stream + a * (s.Hq + 2 * s.Hkv) + 4 * s.Hq
    return (mlp, "top layer backward, MLP") if mlp >= attn else (attn, "top layer backward, attention")


FINAL_NORM_SAVED = "final RMSNorm saves (fp32 input + rsqrt)"


def _loss_terms(s: ModelShape, recipe: Recipe, T: int, keep_logits: bool) -> dict[str, Any]:
    """Bytes alive at the loss forward and backward beyond the final norm's saved tensors, the loss's large
    transient blocks (what the allocator terms scale), and where each comes from. T tokens in the step."""
    a = activation_bytes(recipe)
    V = s.V
    if recipe.cross_entropy == "chunked":
        c = min(recipe.ce_chunk_tokens, T)
        chunk = 6 * V * c  # bf16 logits + fp32 copy, then fp32 softmax + bf16 copy, one chunk at a time
        return {"forward": 2 * a * s.H * T + chunk, "backward": 2 * a * s.H * T, "blocks": chunk,
                "forward_src": f"chunked CE: final norm output + grad of the hidden states (2aH per token) + one "
                               f"chunk's logits (6V x {c} tokens)",
                "backward_src": "chunked CE: the stored grad of the hidden states and its scaled copy (2aH per token)"}
    lh = _unquantized_bytes(recipe)  # lm_head weight dtype = logits dtype
    logits = lh * V
    float_copy = 4 * V if lh != 4 else 0
    # HF ForCausalLMLoss: logits.float(), log_softmax saves its fp32 output; in backward nll_loss's dense grad
    # and log_softmax's grad of the logits are alive with that output: 12V per token at once.
    bwd = 12 * V + (logits if keep_logits else 0)
    return {"forward": (logits + float_copy + 4 * V) * T, "backward": bwd * T, "blocks": bwd * T,
            "forward_src": f"logits + fp32 copy + log_softmax out: V = {V}",
            "backward_src": f"log_softmax out + grad of it + grad of logits (12V per token in fp32): V = {V}"}


def _models_liger(recipe: Recipe, device: str) -> bool:
    return (recipe.liger == "on" or recipe.cross_entropy == "liger"
            or (recipe.liger == "auto" and device == "cuda" and not _compiled(recipe, device)))


def predict_peak(
    model_config,
    recipe: Recipe,
    batch_size: int,
    seq_len: int,
    *,
    optimizer: str = "adamw",
    checkpoint_reentrant: bool = True,
    keep_logits: bool = False,
    device: str = "cuda",
    include_context: bool = True,
) -> MemoryBreakdown:
    """Predicted peak memory of a training step (steady state: AdamW states already exist).

    ``checkpoint_reentrant``: ``loralab.model.enable_checkpointing`` uses reentrant checkpointing.
    ``keep_logits``: the loop keeps ``outputs`` alive through backward (loralab.train deletes it).
    ``device``: "cuda" (bool dropout masks) or "cpu" (float noise) -- for tests on CPU.
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size={batch_size}, seq_len={seq_len}: expected integers >= 1")
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZER_STATES)}")
    if _models_liger(recipe, device):
        raise ConfigError(f"recipe {recipe.name!r}: the memory model does not cover Liger's kernels; measure it "
                          f"(autobatch's measured step) instead")
    s = ModelShape.of(model_config)
    B, S = batch_size, seq_len
    T = B * S
    a = activation_bytes(recipe)
    ckpt = recipe.gradient_checkpointing == "full"
    bd = MemoryBreakdown()
    bd.info = {"batch_size": B, "seq_len": S, "activation_bytes": a, "recipe": recipe.name,
               "attn": recipe.attn_implementation, "checkpointing": recipe.gradient_checkpointing}

    for name, (b, src) in weight_terms(model_config, recipe).items():
        bd.add(name, b, src)
    n_lora = ModelShape.of(model_config).lora_params(recipe)
    bd.add("lora_adapter", 4 * n_lora, f"{n_lora:,} LoRA params x 4 B (fp32: peft autocast_adapter_dtype)")
    bd.add("lora_gradients", 4 * n_lora, f"{n_lora:,} x 4 B, one grad per trainable param")
    k = OPTIMIZER_STATES[optimizer]
    bd.add("optimizer_states", 4 * k * n_lora, f"{optimizer}: {k} fp32 states (exp_avg, exp_avg_sq) x {n_lora:,}")

    # held all step: eager additive mask, RoPE cos/sin, ids/labels
    if recipe.attn_implementation == "eager":
        bd.add("attention_mask", B * S * S * a, f"eager 4-D causal mask B*S*S*{a} B (create_causal_mask)")
    bd.add("small_buffers", 2 * S * s.hd * a + 2 * T * 8, "RoPE cos/sin 2*S*hd*a + input_ids/labels int64")

    g = _layer_saved(s, recipe, S, device)
    layer_full = sum(_sum(v) for v in g.values())
    head_saved = (4 * s.H + 4) * T  # the last layer's output as fp32 (a copy when a = 2) + rsqrt; the LM head saves no input
    loss = _loss_terms(s, recipe, T, keep_logits)

    if ckpt:
        shared = 4 * s.H if a == 4 else 0.0  # the recomputed layer's fp32 input is the checkpoint
        held = s.L * a * s.H
        held_src = f"checkpoints: L*T*a*H = {s.L}*{T}*{a}*{s.H} (each layer's input, HF checkpointing)"
        if recipe.quantization == "int8" and not checkpoint_reentrant:
            leak = s.L * (3 * a * s.H + a * s.I)
            held += leak
        layer_peak, layer_phase = _layer_backward_peak(s, recipe, S, device, shared)
        phases = {
            "loss forward": head_saved + loss["forward"],
            "loss backward": head_saved + loss["backward"],
            layer_phase: layer_peak * T,
        }
    else:
        held = s.L * layer_full
        held_src = f"saved activations, all layers: L*T*{layer_full:,.0f} B/token/layer"
        layer_peak, layer_phase = _layer_backward_peak(s, recipe, S, device, 0.0)
        phases = {
            "loss forward": head_saved + loss["forward"],
            "loss backward": head_saved + loss["backward"],
            layer_phase: (layer_peak - layer_full) * T,  # the top layer's saved part is already in `held`
        }
    phase = max(phases, key=phases.get)
    bd.phase = phase
    bd.add("activations_held", held * T, held_src)
    if phase.startswith("top layer"):
        extra = phases[phase] + _dequant_transient(s, recipe) + _fp8_transient(model_config, recipe, T)
        bd.add("layer_backward", extra, f"{'recomputed ' if ckpt else ''}top layer saved tensors + grads in flight ({phase}) + dequantized weight copy")
        bd.add("logits_and_loss", 0, "freed before the layers' backward")
    else:
        bd.add("final_norm_lm_head_input", head_saved, FINAL_NORM_SAVED)
        bd.add("logits_and_loss", phases[phase] - head_saved,
               loss["forward_src"] if phase == "loss forward" else loss["backward_src"])
    allocated = bd.total
    loss_bytes = head_saved + loss["blocks"]  # as calibrated: the loss's blocks with the final norm's
    if recipe.allocator == "expandable":
        frag_loss = EXPANDABLE_LOSS_FRACTION * loss_bytes
        bd.add("allocator_overhead", EXPANDABLE_FIXED_GIB * GIB + frag_loss,
               f"expandable segments: {EXPANDABLE_LOSS_FRACTION} x loss-backward blocks ({loss_bytes / GIB:.2f} GiB) + "
               f"{EXPANDABLE_FIXED_GIB} GiB; no per-layer term; calibrated once")
        # Under a cap, a failed allocation makes the allocator unmap its free pages and retry: what is left
        # is the fixed part (H200: lora-bf16-ckpt bs 21 under 40 GiB reserved 39.30 for 39.20 allocated).
        bd.info["reserved_under_cap"] = allocated + EXPANDABLE_FIXED_GIB * GIB
    else:
        layer_bytes = _layer_backward_peak(s, recipe, S, device, 0.0)[0] * T
        frag_loss = FRAG_LOSS_FRACTION * loss_bytes
        frag_layer = FRAG_LAYER_FRACTION * layer_bytes
        bd.add("allocator_overhead", ALLOCATOR_FIXED_GIB * GIB + frag_loss + frag_layer,
               f"caching allocator: {FRAG_LOSS_FRACTION} x loss-backward blocks ({loss_bytes / GIB:.2f} GiB) + "
               f"{FRAG_LAYER_FRACTION} x top-layer backward working set ({layer_bytes / GIB:.2f} GiB) + {ALLOCATOR_FIXED_GIB} GiB; calibrated once")
        # Under an allocator cap (set_per_process_memory_fraction) a failed cudaMalloc makes the allocator free
        # its wholly-free cached segments and retry (CUDACachingAllocator: release_cached_blocks). When the peak
        # is the loss itself, the loss blocks are live, not cached: their fragmentation does not count there.
        at_loss = phase.startswith("loss")
        bd.info["reserved_under_cap"] = (allocated + ALLOCATOR_FIXED_GIB * GIB + frag_layer + (0 if at_loss else frag_loss))
    if include_context:
        bd.add("cuda_context", CUDA_CONTEXT_GIB * GIB, "CUDA context, outside torch's allocator (H100/H200, torch 2.x); calibrated")
    bd.info["phases_gib"] = {k: v / GIB for k, v in phases.items()}
    return bd


def calibration_constants() -> dict[str, Any]:
    """The calibrated constants and where they come from, as the benchmarks record them beside a measurement."""
    return {"CUDA_CONTEXT_GIB": CUDA_CONTEXT_GIB, "ALLOCATOR_FIXED_GIB": ALLOCATOR_FIXED_GIB,
            "EXPANDABLE_FIXED_GIB": EXPANDABLE_FIXED_GIB, "EXPANDABLE_LOSS_FRACTION": EXPANDABLE_LOSS_FRACTION,
            "expandable_calibration": EXPANDABLE_CALIBRATION,
            "FRAG_LOSS_FRACTION": FRAG_LOSS_FRACTION, "FRAG_LAYER_FRACTION": FRAG_LAYER_FRACTION,
            "EAGER_EXTRA_SCORE_BUFFERS_CUDA": EAGER_EXTRA_SCORE_BUFFERS_CUDA,
            "INT8_OUTLIER_COL_FRACTION_DOWN": INT8_OUTLIER_COL_FRACTION_DOWN, "calibration": CALIBRATION}
