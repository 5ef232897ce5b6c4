"""Typed configuration: a run is a model, a data source and a recipe.

A *recipe* is a named preset of every training knob (quantization, dtypes,
checkpointing, attention, LoRA, optimizer). A *run* adds what to train on and
how long. Every report prints the fully resolved config (``RunConfig.to_dict``)
so nothing is implicit.

Invalid values raise ``ConfigError`` with a one-line message naming the field
and what was expected; ``run_all.py`` turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A user-supplied value is invalid. The message is one line: input and expectation."""


QUANTIZATIONS = ("none", "int8", "nf4")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa")
CHECKPOINTING = ("none", "full", "selective", "offload")
CROSS_ENTROPY = ("hf", "chunked", "liger")
SWITCH = ("off", "auto", "on")
ALLOCATORS = ("caching", "expandable")
FP8_MODES = ("off", "rowwise", "tensorwise")
FP8_WEIGHT_T = ("copy", "per-step")
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class Recipe:
    """Every knob that changes what training costs or computes."""

    name: str
    """Preset name, printed in every report."""
    quantization: str = "none"
    """Base-weight storage: "none" (param_dtype), "int8" (bitsandbytes LLM.int8) or "nf4" (4-bit, double quant)."""
    param_dtype: str = "float32"
    """dtype of every parameter that is not quantized (norms, embeddings, LM head, LoRA)."""
    compute_dtype: str = "float32"
    """dtype the nf4 kernels compute in; for int8 bitsandbytes always computes in fp16."""
    autocast: bool = False
    """Run forward under torch.autocast(compute_dtype). The study used none."""
    gradient_checkpointing: str = "full"
    """"full": recompute each decoder layer in backward (reduces memory, ~1/3 more FLOPs); "none"."""
    attn_implementation: str = "eager"
    """"eager" (2023 default: materialises the seq x seq scores) or "sdpa" (fused, O(seq) memory)."""
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_gamma: float = 0.85
    """StepLR factor applied once per epoch (llama-recipes)."""
    prepare_for_kbit: bool = True
    """peft's prepare_model_for_kbit_training: casts non-quantized params to fp32, enables input grads."""
    # --- speed levers (loralab.fast); the defaults leave seed and qlora as they were
    checkpoint_layers: int | None = None
    """None: gradient_checkpointing applies to every decoder layer; N: only to the first N
    (loralab.fast's non-reentrant wrapper; 0 layers = none)."""
    cross_entropy: str = "hf"
    """"hf": logits materialised, HF's fp32 loss; "chunked": loralab.fast's LM head + CE in chunks of
    tokens, never the whole batch's fp32 logits (runs everywhere); "liger": Liger's fused linear CE (CUDA)."""
    ce_chunk_tokens: int = 2048
    """Tokens per chunk of the "chunked" cross-entropy (chunk x vocab fp32 logits at a time)."""
    liger: str = "off"
    """Liger kernels for RoPE, RMSNorm, SwiGLU: "off", "on" (error if unavailable) or "auto"
    (on when CUDA and liger-kernel are there and torch.compile is not active)."""
    compile: str = "off"
    """torch.compile of each decoder layer (regional): "off", "on", "auto" (on when CUDA)."""
    lora_matmul_dtype: str = "adapter"
    """"adapter": peft's default, the input is cast to the adapter's fp32 (a T x H copy per LoRA
    module); "input": the fp32 adapter weights are cast to the input's dtype (bf16) instead."""
    doc_position_ids: bool = False
    """Packed rows: position ids restart at every BOS (per-document RoPE positions)."""
    allocator: str = "caching"
    """The CUDA caching allocator's segments (loralab.allocator): "caching" is PyTorch's default, what
    llama-recipes ran under (whole segments cached and split; how much reserved memory sits unused
    varies from run to run); "expandable" sets ``expandable_segments:True`` (segments grow in place by
    pages, so reserved memory tracks allocated memory). Applied when the model is loaded."""
    fp8: str = "off"
    """Frozen base linears in FP8 e4m3 (loralab.fp8; needs FP8 tensor cores, compute capability 8.9+, else
    ConfigError): both GEMMs of each frozen linear (forward, input gradient) in FP8, LoRA unchanged (bf16).
    "rowwise": one fp32 scale per weight output channel and per token (the accurate one); "tensorwise": one
    per tensor (a whole-tensor amax before each cast: no faster than bf16 once that is counted); "off"."""
    fp8_weight_t: str = "copy"
    """How the input-gradient GEMM (dy @ W) gets W in the K-major layout FP8 GEMMs need: "copy" keeps W^T in
    e4m3 (+1 B per weight: the base then needs as much memory as bf16, 12.1 GiB at 7B); "per-step" transposes
    it in every backward (2 B of memory traffic per weight and step, one weight's transient)."""
    fp8_fused: bool = True
    """One FP8 GEMM for q/k/v (N = 3H at 7B) and one for gate/up (N = 2I): fewer, larger GEMMs, fewer launches
    and one quantisation of their shared input (the weights are concatenated once, at load)."""
    fp8_shared_quant: bool = True
    """Unfused only: quantise the input q/k/v (gate/up) share once; False: each GEMM quantises its own
    (peft's per-module forward; torch.compile's CSE may merge them). Costs nothing when fused."""
    fp8_lm_head: bool = False
    """The LM head in FP8 too (logits and their input gradient; chunked or HF loss). Its softmax gradient
    spans ~5 decades per row, coarse in e4m3: measure before turning it on (benchmarks/fp8_layer.py)."""
    packing: bool = True
    """True: llama-recipes packing (concatenate every prompt, cut into seq_len chunks, drop the tail);
    False: one dialogue per row, right-padded. A run may override it (RunConfig.packing)."""

    def __post_init__(self) -> None:
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("compute_dtype", self.compute_dtype, DTYPES)
        _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        _choice("attn_implementation", self.attn_implementation, ATTENTION)
        _choice("cross_entropy", self.cross_entropy, CROSS_ENTROPY)
        _choice("liger", self.liger, SWITCH)
        _choice("compile", self.compile, SWITCH)
        _choice("lora_matmul_dtype", self.lora_matmul_dtype, ("adapter", "input"))
        _choice("allocator", self.allocator, ALLOCATORS)
        _choice("fp8", self.fp8, FP8_MODES)
        _choice("fp8_weight_t", self.fp8_weight_t, FP8_WEIGHT_T)
        if self.fp8 != "off" and (self.quantization != "none" or self.param_dtype != "bfloat16"):
            raise ConfigError(f"fp8={self.fp8!r} with quantization={self.quantization!r}, param_dtype={self.param_dtype!r}: "
                              "expected quantization='none' and param_dtype='bfloat16' (the FP8 base is cast from bf16)")
        if self.fp8_lm_head and (self.fp8 == "off" or self.cross_entropy == "liger"):
            raise ConfigError(f"fp8_lm_head=True with fp8={self.fp8!r}, cross_entropy={self.cross_entropy!r}: "
                              "expected fp8 'rowwise'/'tensorwise' and cross_entropy 'chunked' or 'hf'")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ConfigError(f"checkpoint_layers={self.checkpoint_layers}: expected None or an integer >= 0")
        if self.ce_chunk_tokens < 1:
            raise ConfigError(f"ce_chunk_tokens={self.ce_chunk_tokens}: expected an integer >= 1")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r={self.lora_r}: expected an integer >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: expected 0 <= p < 1")
        if not self.lora_targets:
            raise ConfigError("lora_targets=(): expected at least one module name")
        for t in self.lora_targets:
            _choice("lora_targets", t, LORA_TARGETS_ALL)
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate}: expected > 0")

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


RECIPES: dict[str, Recipe] = {
    # The study (Dell 2023, llama-recipes defaults): int8 base, everything else
    # fp32, no autocast, checkpointing on, eager attention, LoRA r8 on q/v.
    "seed": Recipe(name="seed", quantization="int8"),
    # loralab's own (loralab.fast, each lever a switch): bf16 weights and compute,
    # SDPA (flash) attention, no checkpointing, LoRA without dropout and in bf16
    # (fp32 master weights), chunked cross-entropy, compiled decoder layers on CUDA
    # (Liger's RoPE/RMSNorm/SwiGLU when compile is off and liger-kernel is there).
    "fast": Recipe(
        name="fast",
        quantization="none",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        gradient_checkpointing="none",
        attn_implementation="sdpa",
        lora_dropout=0.0,
        prepare_for_kbit=False,
        cross_entropy="chunked",
        liger="auto",
        compile="auto",
        lora_matmul_dtype="input",
        allocator="expandable",
    ),
    # The built-in default's recipe: what a *small* model needs to learn a task in minutes on a
    # CPU. A randomly initialised tiny base cannot be taught by the study's LoRA (r8 on q/v at
    # lr 1e-4: no ROUGE gain after 600 steps); LoRA on every linear layer at r16 and lr 3e-3,
    # one dialogue per row, lifts ROUGE-L by ~0.5 in ~20 s of training. fp32, SDPA, no checkpointing.
    "demo": Recipe(
        name="demo",
        quantization="none",
        param_dtype="float32",
        compute_dtype="float32",
        gradient_checkpointing="none",
        attn_implementation="sdpa",
        lora_r=16,
        lora_alpha=32,
        lora_targets=LORA_TARGETS_ALL,
        learning_rate=3e-3,
        prepare_for_kbit=False,
        packing=False,
        allocator="expandable",
    ),
    # QLoRA: 4-bit NF4 base with double quantization, bf16 compute.
    "qlora": Recipe(
        name="qlora",
        quantization="nf4",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        gradient_checkpointing="full",
        attn_implementation="sdpa",
        allocator="expandable",
    ),
}
# fast with a frozen FP8 base (loralab.fp8; FP8 tensor cores only: H100/H200/L40S/RTX 4090): every decoder
# linear in e4m3 with rowwise scales, q/k/v and gate/up fused, W^T kept; LoRA and the LM head stay bf16.
RECIPES["fast8"] = RECIPES["fast"].replace(name="fast8", fp8="rowwise", fp8_weight_t="copy", fp8_fused=True,
                                           fp8_shared_quant=True, fp8_lm_head=False)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass
class RunConfig:
    """One training run: what model, what data, which recipe, how long."""

    model: str = "tiny"
    """Preset name ("tiny", "llama2-7b") or a Hugging Face model folder."""
    tokenizer: str | None = None
    """Tokenizer folder or SentencePiece .model file; None: the model's own."""
    data: str = "builtin"
    """"builtin", a SAMSum folder (train/val/test.json), or a JSON/JSONL/CSV file."""
    recipe: Recipe = field(default_factory=lambda: RECIPES["seed"])
    batch_size: int = 1
    seq_len: int = 2048
    """Packed chunk length (the study: 2048)."""
    packing: bool | None = None
    """None: the recipe's (seed: packed, as llama-recipes). True: concatenate, cut, drop the tail.
    False: one dialogue per row, padded."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: full epochs)."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    gpu_memory_gib: float | None = None
    """Cap the CUDA caching allocator to emulate a card of this size (40: the study's A100)."""
    seed: int = 42
    log_every: int = 0
    """Print a progress line every N steps (0: about 20 lines per run). steps.jsonl has every step."""

    def __post_init__(self) -> None:
        if isinstance(self.recipe, str):
            self.recipe = get_recipe(self.recipe)
        if self.packing is None:
            self.packing = self.recipe.packing
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}: expected an integer >= 1")
        if self.seq_len < 8:
            raise ConfigError(f"seq_len={self.seq_len}: expected an integer >= 8")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: expected an integer >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: expected an integer >= 1 or None")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.log_every < 0:
            raise ConfigError(f"log_every={self.log_every}: expected 0 (auto) or an integer >= 1")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"gpu_memory_gib={self.gpu_memory_gib}: expected a number > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"]["lora_targets"] = list(self.recipe.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        r = d.get("recipe", "seed")
        if isinstance(r, dict):
            r = dict(r)
            r["lora_targets"] = tuple(r.get("lora_targets", ("q_proj", "v_proj")))
            d["recipe"] = Recipe(**r)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"config keys {sorted(unknown)}: expected only {sorted(known)}")
        return cls(**d)
