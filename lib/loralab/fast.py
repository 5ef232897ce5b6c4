"""The ``fast`` recipe's levers: each one a switch on ``loralab.config.Recipe``.

``apply_levers(model, recipe)`` is called by ``loralab.model.add_lora`` after peft has
attached the adapters; ``forward_loss(model, batch, recipe)`` is the training loop's loss.
What each lever does, and why it is faster (T = tokens in the step, H hidden, V vocab):

* bf16 base, SDPA attention: ``param_dtype``, ``attn_implementation`` (from_pretrained does it).
  With a packed batch and no padding, SDPA runs a fused causal kernel (no S x S matrix): on torch
  2.11 + Hopper that is cuDNN's (torch's own first choice there; 1.65x FlashAttention-2's speed at
  the 7B shape, benchmarks/results/attention_kernels_H200_20261130-1231.md), else FlashAttention-2.
* ``allocator = "expandable"`` (loralab.allocator): not a speed lever but a memory one: the
  reserved peak follows the allocated one (fast at batch 3 under 40 GiB: 32.4 GiB reserved instead
  of 40.0, benchmarks/results/compare_H200_20261130-*.md), so larger batches fit and the memory model's
  prediction holds.
* ``lora_dropout = 0``: peft then uses ``nn.Identity`` instead of ``nn.Dropout``, so the LoRA
  path makes no dropped copy of its input (and no mask) per adapted module. Dropout on the
  adapter input is a regulariser, not part of the math being sped up; it is a quality knob
  measured elsewhere, not a speed one.
* ``lora_matmul_dtype = "input"``: peft casts the layer input to the adapter's dtype (fp32 under
  its ``autocast_adapter_dtype``): a T x H fp32 copy per adapted module, saved for backward.
  Here the fp32 adapter weights (r x H, tiny) are cast to bf16 instead; the weights and AdamW
  stay fp32 (mixed precision, Micikevicius et al. 2018), the matmuls run in bf16.
* ``cross_entropy = "chunked"``: the LM head and the loss run over chunks of
  ``ce_chunk_tokens`` tokens. HF's loss materialises T x V logits in bf16, a fp32 copy, the
  log-softmax and two gradients of it (12 V bytes per token at the backward peak: 1.5 GiB per
  2048 tokens at V = 32000). The chunked loss computes, per chunk, logits -> fp32 -> logsumexp ->
  (softmax - onehot) / N -> grad of the hidden states, in the forward, and keeps only that grad
  (T x H, bf16) for backward: the method of Liger's fused linear cross-entropy (Hsu et al. 2024,
  "Liger Kernel", Sec. 3.3), in plain PyTorch, so it runs on CPU too. Same FLOPs as HF's
  (forward logits + input gradient; no weight gradient for the frozen head).
* ``liger``: Liger kernels (Triton) for RoPE, RMSNorm and SwiGLU, patched onto this model's
  modules with ``liger_kernel.transformers.apply_liger_kernel_to_llama(..., model=...)``.
  CUDA only; "auto" skips it when torch.compile is on (Inductor fuses the same ops itself).
* ``compile``: ``torch.compile`` of each decoder layer ("regional compilation": one layer's
  code, compiled once, reused by all layers). Inductor fuses RMSNorm, RoPE, SiLU * up, the
  LoRA scale-and-add and the residual adds, and its min-cut partitioner saves fewer tensors.
  "auto" = on with CUDA only: on CPU compile time dwarfs a tiny step.
* ``gradient_checkpointing`` + ``checkpoint_layers``: "full" recomputes whole layers (HF's
  reentrant path when it covers all layers, as the study; loralab's non-reentrant wrapper when
  ``checkpoint_layers`` picks the first N); "selective" keeps the outputs of matmuls and
  attention and recomputes the cheap elementwise ops (torch's selective activation
  checkpointing; the policy of torchtitan's op-level SAC); "offload" moves each layer's saved
  activations (not the frozen weights) to pinned CPU memory and back in backward.
* ``fp8``: the frozen base linears in FP8 e4m3 (loralab.fp8: both GEMMs of each frozen linear on
  Hopper's FP8 tensor cores, ~1.7x bf16's matmul rate; LoRA stays bf16). GPUs with FP8 tensor cores only.
* ``doc_position_ids``: position ids that restart at every BOS of a packed row, so RoPE sees
  each dialogue from position 0. Attention still crosses documents with SDPA; isolating them
  needs a varlen kernel (flash_attention_2), which this recipe does not require.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LIGER_UNAVAILABLE = "unavailable (needs CUDA + liger-kernel)"


# ------------------------------------------------------------------ availability

def liger_status() -> tuple[bool, str]:
    """(usable, why): Liger's Triton kernels need a CUDA device and the liger-kernel package."""
    if not torch.cuda.is_available():
        return False, LIGER_UNAVAILABLE
    if importlib.util.find_spec("liger_kernel") is None:
        return False, LIGER_UNAVAILABLE
    try:
        from importlib.metadata import version
        return True, f"available (liger-kernel {version('liger-kernel')})"
    except Exception:  # noqa: BLE001 - metadata is cosmetic
        return True, "available"


def compile_status(device: torch.device) -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, "unavailable (torch without torch.compile)"
    return True, f"available (torch {torch.__version__}, {device.type})"


def _resolve(switch: str, usable: bool, what: str, why: str) -> bool:
    from loralab.config import ConfigError

    if switch == "on" and not usable:
        raise ConfigError(f"{what}='on': {why}; expected 'auto' or 'off' here")
    return switch == "on" or (switch == "auto" and usable)


# ------------------------------------------------------------------ model plumbing

def base_causal_lm(model):
    """The ``LlamaForCausalLM`` inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder_layers(model) -> list:
    return list(base_causal_lm(model).model.layers)


# ------------------------------------------------------------------ chunked cross-entropy

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid tokens of CE(hidden @ weight^T, labels), chunk by chunk.

    Forward computes, per chunk c of tokens: z = h_c W^T (in W's dtype, then fp32, as HF's
    ``logits.float()``), lse = logsumexp(z), loss_c = sum(lse - z[y]); and the gradients
    dL/dz = (softmax(z) - onehot(y)) / N_valid, dL/dh_c = dL/dz W, dL/dW += dL/dz^T h_c (only if
    W requires grad). Backward only scales the stored grads: no logits are kept or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        n = hidden.shape[0]
        valid_all = labels != IGNORE_INDEX
        if isinstance(weight, torch.Tensor):
            w_dtype = weight.dtype
            logits_of, grad_h_of = (lambda h: h @ weight.t()), (lambda g: g.to(w_dtype) @ weight)
        else:  # a frozen FP8 head (loralab.fp8.FP8Linear): both matmuls in FP8, bf16 out, no weight gradient
            w_dtype = torch.bfloat16
            logits_of, grad_h_of = weight.head_matmuls()
        acc = torch.promote_types(w_dtype, torch.float32)  # fp32 (fp64 stays fp64)
        n_valid = valid_all.sum().clamp_min(1).to(acc)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            y = labels[s:s + chunk]
            valid = valid_all[s:s + chunk]
            z = logits_of(h).to(acc)  # (c, V) fp32: the only logits alive
            lse = torch.logsumexp(z, dim=-1)
            y0 = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
            target = z.gather(1, y0).squeeze(1)
            total += ((lse - target) * valid).sum()
            if need_h or need_w:
                g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, y0, -torch.ones_like(y0, dtype=g.dtype))
                g.mul_((valid.to(g.dtype) / n_valid).unsqueeze(1))  # ignored rows -> 0
                if need_h:
                    grad_h[s:s + chunk] = grad_h_of(g)
                if need_w:
                    grad_w += g.t() @ h.to(acc)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = w_dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_tokens: int = 2048) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T`` against ``labels`` (-100 ignored), mean over valid tokens.

    hidden (N, H), weight (V, H) or a frozen FP8 head (``loralab.fp8.FP8Linear``), labels (N,) already
    shifted. Peak extra memory: one chunk of chunk_tokens x V fp32 logits, plus the (N, H) input gradient.
    """
    out = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, int(chunk_tokens))
    return out


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF ``ForCausalLMLoss``: pad with -100 on the right, then shift left (token t predicts t+1)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


# ------------------------------------------------------------------ per-document positions

def doc_position_ids(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 at every ``bos_id`` of each packed row.

    [[1, a, b, 1, c]] -> [[0, 1, 2, 0, 1]]; a row's first tokens (the tail of a document cut by
    packing) count from 0 too.
    """
    b, s = input_ids.shape
    idx = torch.arange(s, device=input_ids.device).expand(b, s)
    starts = torch.where(input_ids == bos_id, idx, torch.zeros_like(idx))
    last_start = torch.cummax(starts, dim=1).values
    return idx - last_start


# ------------------------------------------------------------------ the loss

def forward_loss(model, batch: dict[str, torch.Tensor], recipe) -> torch.Tensor:
    """The training loss of one batch as the recipe computes it (a scalar tensor with grad).

    ``cross_entropy`` "hf" / "liger": ``model(**batch).loss`` (Liger's fused loss replaces the
    LM's forward). "chunked": the decoder's last hidden states -> ``chunked_linear_cross_entropy``
    with the LM head's weight. The full attention mask is dropped when it is all ones (packed
    rows), so SDPA runs its causal kernel without a mask.
    """
    batch = dict(batch)
    if recipe.doc_position_ids and "position_ids" not in batch:
        bos = getattr(base_causal_lm(model).config, "bos_token_id", None)
        if bos is not None:
            batch["position_ids"] = doc_position_ids(batch["input_ids"], int(bos))
    if recipe.cross_entropy != "chunked":
        outputs = model(**batch)
        return outputs.loss
    lm = base_causal_lm(model)
    labels = batch.pop("labels")
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        batch.pop("attention_mask")
    hidden = lm.model(**batch).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels(labels).reshape(-1)
    head = lm.lm_head
    weight = head if hasattr(head, "head_matmuls") else head.weight  # FP8 head (recipe.fp8_lm_head) or bf16
    return chunked_linear_cross_entropy(h, weight, y, recipe.ce_chunk_tokens)


# ------------------------------------------------------------------ LoRA in the input's dtype

def _linear_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    b = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, self.weight.to(x.dtype), b)


def lora_in_input_dtype(model) -> int:
    """peft LoRA layers: no input cast to fp32; lora_A/lora_B cast their fp32 weights to the input's dtype.

    Returns how many LoRA layers were changed. With a peft that ignores
    ``cast_input_dtype_enabled`` the input is still cast (correct, just not faster).
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), torch.nn.ModuleDict):
            m.cast_input_dtype_enabled = False
            for d in (m.lora_A, m.lora_B):
                for lin in d.values():
                    if isinstance(lin, torch.nn.Linear):
                        lin.forward = _linear_in_input_dtype.__get__(lin, type(lin))
            n += 1
    return n


# ------------------------------------------------------------------ Liger

def apply_liger(model, fused_linear_cross_entropy: bool = False) -> str:
    """Liger's RoPE, RMSNorm and SwiGLU (and optionally its fused linear CE) on this Llama model.

    Patches the model's own modules (``model=``); RoPE is a module-level function of
    transformers' modeling_llama, so it applies to every Llama in this process.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    lm = base_causal_lm(model)
    kw = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
              fused_linear_cross_entropy=fused_linear_cross_entropy)
    try:
        apply_liger_kernel_to_llama(model=lm, **kw)
    except TypeError as e:  # an old liger-kernel without model=: class-level only
        raise RuntimeError(f"liger-kernel too old to patch a built model ({e})") from e
    return "on (RoPE, RMSNorm, SwiGLU" + (", fused linear CE)" if fused_linear_cross_entropy else ")")


# ------------------------------------------------------------------ checkpointing and compile

_SAVE_OPS: set | None = None


def _save_ops() -> set:
    """Ops whose outputs selective checkpointing keeps: matmuls (FP8 ones too: loralab.fp8) and attention kernels."""
    global _SAVE_OPS
    if _SAVE_OPS is None:
        aten = torch.ops.aten
        names = ["mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                 "_efficient_attention_forward"]
        ops = set()
        for n in names:
            op = getattr(aten, n, None)
            if op is not None:
                ops.add(op.default)
        _SAVE_OPS = ops
    return _SAVE_OPS


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations to pinned CPU memory and back; parameters (frozen weights) stay put."""

    def __init__(self, param_ptrs: set[int], min_numel: int = 1 << 16):
        def pack(t: torch.Tensor):
            if t.device.type != "cuda" or t.numel() < min_numel or t.untyped_storage().data_ptr() in param_ptrs:
                return t
            cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            cpu.copy_(t, non_blocking=True)
            return (t.device, cpu)

        def unpack(p):
            if isinstance(p, tuple):
                dev, cpu = p
                return cpu.to(dev, non_blocking=True)
            return p

        super().__init__(pack, unpack)


def _checkpoint_fn(mode: str, model) -> Any:
    from torch.utils.checkpoint import checkpoint

    if mode == "full":
        return functools.partial(checkpoint, use_reentrant=False)
    if mode == "selective":
        return functools.partial(checkpoint, use_reentrant=False, context_fn=_selective_context)
    if mode == "offload":
        ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def offload(fn, *args, **kwargs):
            with _OffloadHooks(ptrs):
                return fn(*args, **kwargs)
        return offload
    raise ValueError(mode)


def _layer_call(layer, ckpt, ckpt_compiled=None):
    inner = layer._loralab_call

    def call(*args, **kwargs):
        if ckpt is not None and layer.training and torch.is_grad_enabled():
            if ckpt_compiled is not None:  # the checkpoint inside the compiled region
                return ckpt_compiled(*args, **kwargs)
            return ckpt(inner, *args, **kwargs)
        return inner(*args, **kwargs)
    return call


def compile_options(recipe) -> dict[str, Any]:
    """The ``torch.compile`` options of the recipe's decoder layers: the one compile setting that training and
    every benchmark use."""
    return {"dynamic": recipe.compile_dynamic}


def configure_layers(model, *, compile: bool, checkpointing: str = "none", checkpoint_layers: int | None = None,
                     compile_options: dict | None = None) -> dict[str, Any]:
    """(Re)wire every decoder layer: optionally compiled, optionally checkpointed by loralab's wrapper.

    Uses ``nn.Module._compiled_call_impl`` (what ``nn.Module.compile`` sets), so module names,
    hooks and the peft state dict are untouched. Can be called again to switch variants; the
    compiled callable of each layer is kept and reused.
    """
    layers = decoder_layers(model)
    n_ckpt = 0 if checkpointing == "none" else (len(layers) if checkpoint_layers is None else min(checkpoint_layers, len(layers)))
    ckpt = _checkpoint_fn(checkpointing, model) if n_ckpt else None
    opts = {} if compile_options is None else compile_options
    for i, layer in enumerate(layers):
        if not hasattr(layer, "_loralab_eager"):
            layer._loralab_eager = layer._call_impl
        if compile:
            if getattr(layer, "_loralab_compiled", None) is None:
                layer._loralab_compiled = torch.compile(layer._loralab_eager, **opts)
            layer._loralab_call = layer._loralab_compiled
        else:
            layer._loralab_call = layer._loralab_eager
        use_ckpt = ckpt if i < n_ckpt else None
        # compile + full/selective: compile the checkpointed layer (checkpoint inside the compiled region,
        # as torchtitan orders them), not a checkpoint around the compiled layer: from outside, the
        # recompute reruns the whole compiled forward and selective's policy never sees the matmuls
        # (benchmarks/results/ablation_H200_20261130-095517.md). Offload's saved-tensor hooks stay outside.
        ckpt_compiled = None
        if compile and use_ckpt is not None and checkpointing in ("full", "selective"):
            cache = getattr(layer, "_loralab_compiled_ckpt", None)
            if cache is None:
                cache = layer._loralab_compiled_ckpt = {}
            if checkpointing not in cache:
                cache[checkpointing] = torch.compile(functools.partial(use_ckpt, layer._loralab_eager), **opts)
            ckpt_compiled = cache[checkpointing]
        layer._compiled_call_impl = _layer_call(layer, use_ckpt, ckpt_compiled) if (compile or use_ckpt) else None
    info = {"compiled_layers": len(layers) if compile else 0, "checkpointed_layers": n_ckpt,
            "checkpointing": checkpointing if n_ckpt else "none", "checkpoint_layers": checkpoint_layers}
    base_causal_lm(model)._loralab_layers = info
    return info


# ------------------------------------------------------------------ attention kernel

def sdpa_order() -> str:
    """SDPA's backend priority in this process, e.g. "cudnn > flash > efficient > math" (torch 2.11 on an H200:
    cuDNN's fused attention comes first, 1.65x FlashAttention-2's speed at the 7B shape,
    benchmarks/results/attention_kernels_H200_20261130-1231.md)."""
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    if get is None:
        return "torch's default"
    from torch.nn.attention import SDPBackend

    names = {int(b): n.lower().replace("_attention", "") for n, b in SDPBackend.__members__.items()}
    return " > ".join(names.get(int(b), str(b)) for b in get() if names.get(int(b)) not in ("overrideable", "error"))


# ------------------------------------------------------------------ all levers

def apply_levers(model, recipe, device: torch.device | None = None) -> dict[str, str]:
    """Switch on the recipe's levers on a PeftModel; returns {lever: status} (also ``model.loralab_levers``).

    Levers a plain recipe (seed, qlora) leaves at their defaults are reported "off" and cost nothing.
    """
    if device is None:
        device = next(model.parameters()).device
    lv: dict[str, str] = {}
    lv["base_dtype"] = recipe.param_dtype if recipe.quantization == "none" else f"{recipe.quantization} + {recipe.param_dtype}"
    lv["attention"] = recipe.attn_implementation + (f" (kernel order: {sdpa_order()})" if recipe.attn_implementation == "sdpa" else "")
    lv["lora_dropout"] = f"{recipe.lora_dropout}" + (" (no dropout copy)" if recipe.lora_dropout == 0 else "")
    if recipe.lora_matmul_dtype == "input":
        n = lora_in_input_dtype(model)
        lv["lora_matmul_dtype"] = f"input dtype ({n} LoRA layers; fp32 master weights)"
    else:
        lv["lora_matmul_dtype"] = "adapter (peft default: input cast to fp32)"
    lv["cross_entropy"] = recipe.cross_entropy + (f" ({recipe.ce_chunk_tokens} tokens per chunk)" if recipe.cross_entropy == "chunked" else "")

    c_ok, c_why = compile_status(device)
    use_compile = _resolve(recipe.compile, c_ok, "compile", c_why) and (recipe.compile == "on" or device.type == "cuda")
    l_ok, l_why = liger_status()
    liger_wanted = recipe.liger == "on" or (recipe.liger == "auto" and not use_compile)
    use_liger = liger_wanted and _resolve(recipe.liger, l_ok, "liger", l_why)
    if recipe.cross_entropy == "liger" and not l_ok:
        from loralab.config import ConfigError
        raise ConfigError(f"cross_entropy='liger': {l_why}; expected 'chunked' or 'hf' here")
    if use_liger or recipe.cross_entropy == "liger":
        lv["liger"] = apply_liger(model, fused_linear_cross_entropy=recipe.cross_entropy == "liger")
        if not use_liger:  # FLCE only was asked: the class patches came with it; say so
            lv["liger"] += " (asked for the fused CE)"
    else:
        lv["liger"] = "off" if recipe.liger == "off" else (
            "off (torch.compile fuses these ops)" if (recipe.liger == "auto" and use_compile) else f"off: {l_why}")

    if recipe.fp8 != "off":  # after Liger: the FP8 MLP forward replaces its SwiGLU one
        from loralab.fp8 import apply_fp8
        lv["fp8"] = apply_fp8(model, recipe, device)
    else:
        lv["fp8"] = "off"

    ours = recipe.gradient_checkpointing in ("selective", "offload") or (
        recipe.gradient_checkpointing == "full" and recipe.checkpoint_layers is not None)
    if use_compile or ours:
        info = configure_layers(model, compile=use_compile,
                                checkpointing=recipe.gradient_checkpointing if ours else "none",
                                checkpoint_layers=recipe.checkpoint_layers, compile_options=compile_options(recipe))
        if use_compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    else:
        info = {"checkpointed_layers": 0}
    lv["compile"] = (f"on (each decoder layer, dynamic={recipe.compile_dynamic})" if use_compile else
                     ("off (CPU: auto compiles on CUDA only)" if recipe.compile == "auto" else "off"))
    if recipe.gradient_checkpointing == "none":
        lv["checkpointing"] = "none"
    elif ours:
        lv["checkpointing"] = f"{recipe.gradient_checkpointing} on {info['checkpointed_layers']} layers (non-reentrant)"
    else:
        lv["checkpointing"] = "full on all layers (HF, reentrant)"
    lv["doc_position_ids"] = "on" if recipe.doc_position_ids else "off"
    lv["allocator"] = recipe.allocator + (" (expandable_segments)" if recipe.allocator == "expandable" else " (PyTorch default)")
    model.loralab_levers = lv
    return lv
