"""Typed configuration: a run is a model, a data source, a recipe, the batch sizes to sweep, and where.

A *recipe* (``Recipe``) is a named preset of every training knob (quantization, dtypes,
checkpointing, attention, LoRA, optimizer, speed levers). ``RECIPES`` is the one registry of every
recipe and variant any notebook or benchmark runs. A *run* (``RunConfig``) adds what to train on,
how long, on which devices and which reports: run_all.py builds it once from its flags
(``RunConfig.from_options``), writes it to the run folder and hands it to every notebook; a notebook
opened in JupyterLab builds the same object from its own parameters cell. Every report prints the
fully resolved config (``RunConfig.to_dict``), so nothing is implicit.

Invalid values raise ``ConfigError`` with a one-line message naming the field and what was
expected; ``run_all.py`` turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
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


LORA_TARGET_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                     "down": "down_proj"}


def parse_lora_targets(value: str | tuple | list) -> tuple[str, ...]:
    """``--lora-targets``: "q,v", "all-linear", or module names ("q_proj,k_proj,...", short names allowed)."""
    items = [value] if isinstance(value, str) else list(value)
    names = [p.strip() for v in items for p in str(v).split(",") if p.strip()]
    if names == ["all-linear"]:
        return LORA_TARGETS_ALL
    out = []
    for n in names:
        full = LORA_TARGET_SHORT.get(n, n)
        if full not in LORA_TARGETS_ALL:
            raise ConfigError(f"--lora-targets {n!r}: expected 'all-linear' or names from "
                              f"{', '.join(LORA_TARGETS_ALL)} (or q, k, v, o, gate, up, down)")
        if full not in out:
            out.append(full)
    if not out:
        raise ConfigError("--lora-targets: empty; expected 'q,v', 'all-linear' or module names")
    return tuple(out)


def apply_lora_options(recipe: "Recipe", lora_r: int | None = None, lora_alpha: int | None = None,
                       lora_targets: str | tuple | list | None = None) -> "Recipe":
    """The recipe with the user's LoRA rank, alpha and target modules (None: the recipe's own)."""
    changes: dict[str, Any] = {}
    if lora_r is not None:
        changes["lora_r"] = lora_r
    if lora_alpha is not None:
        if lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha {lora_alpha}: expected a number > 0")
        changes["lora_alpha"] = lora_alpha
    if lora_targets:
        changes["lora_targets"] = parse_lora_targets(lora_targets)
    return recipe.replace(**changes) if changes else recipe


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
    compile_dynamic: bool | None = None
    """``torch.compile(dynamic=...)`` of those layers, for training and benchmarks alike. None is torch's
    default: a static graph for the first shape, a dimension turns symbolic once it changes (packed rows
    never change shape within a run; unpacked, padded rows do)."""
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
    about: str = ""
    """One line: what this recipe is for (printed in reports and ``run_all.py --help``)."""

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


_FAST = Recipe(
    name="fast", quantization="none", param_dtype="bfloat16", compute_dtype="bfloat16",
    gradient_checkpointing="none", attn_implementation="sdpa", lora_dropout=0.0, prepare_for_kbit=False,
    cross_entropy="chunked", liger="auto", compile="auto", lora_matmul_dtype="input", allocator="expandable",
    about="loralab's own: bf16, SDPA, LoRA without dropout in bf16 (fp32 master weights), chunked "
          "cross-entropy, torch.compile per decoder layer (CUDA), expandable segments")
# plain HF + PEFT in bf16, as a user writes it: dropout 0.05, peft's fp32 adapter matmul, HF's loss, no compile
_HF = _FAST.replace(name="hf-peft", lora_dropout=0.05, cross_entropy="hf", liger="off", compile="off",
                    lora_matmul_dtype="adapter", allocator="caching",
                    about="plain Hugging Face + PEFT LoRA in bf16 with SDPA, as a user writes it (benchmarks)")
# the memory sweep's bf16 LoRA: fast's layers (compiled on CUDA, LoRA in bf16, no dropout) with HF's loss
_LORA_BF16 = _FAST.replace(name="lora-bf16", cross_entropy="hf", liger="off",
                           about="bf16 LoRA with fast's layers and HF's loss (the memory sweeps)")
# fast with a frozen FP8 base (loralab.fp8; FP8 tensor cores only: H100/H200/L40S/RTX 4090): every decoder linear in
# e4m3 with rowwise scales, q/k/v and gate/up fused, W^T kept; LoRA and the LM head stay bf16
_FP8 = _FAST.replace(name="fast8", fp8="rowwise", fp8_weight_t="copy", fp8_fused=True, fp8_shared_quant=True,
                     fp8_lm_head=False, about="fast with a frozen FP8 (e4m3, rowwise) base: both GEMMs of every frozen "
                                              "linear on FP8 tensor cores (H100/H200/L40S)")
_SEED = Recipe(name="seed", quantization="int8",
               about="the study's recipe (llama-recipes 2023): int8 base, fp32 rest, no autocast, reentrant "
                     "checkpointing, eager attention, LoRA r8 on q/v, packed 2048")


def _registry(*recipes: Recipe) -> dict[str, Recipe]:
    return {r.name: r for r in recipes}


RECIPES: dict[str, Recipe] = _registry(
    _SEED,
    _FAST,
    # What a *small* model needs to learn a task in minutes on a CPU. A randomly initialised tiny base
    # cannot be taught by the study's LoRA (r8 on q/v at lr 1e-4: no ROUGE gain after 600 steps); LoRA on
    # every linear layer at r16 and lr 3e-3, one dialogue per row, lifts ROUGE-L by ~0.5 in ~20 s.
    Recipe(name="demo", quantization="none", param_dtype="float32", compute_dtype="float32",
           gradient_checkpointing="none", attn_implementation="sdpa", lora_r=16, lora_alpha=32,
           lora_targets=LORA_TARGETS_ALL, learning_rate=3e-3, prepare_for_kbit=False, packing=False,
           allocator="expandable",
           about="the tiny model's default: fp32 LoRA r16 on every linear, lr 3e-3, one dialogue per row"),
    Recipe(name="qlora", quantization="nf4", param_dtype="bfloat16", compute_dtype="bfloat16",
           gradient_checkpointing="full", attn_implementation="sdpa", allocator="expandable",
           about="QLoRA: 4-bit NF4 base with double quantization, bf16 compute, checkpointing"),
    # --- variants the memory sweeps, the model check and the benchmarks measure
    # The study's recipe with SDPA: a what-if, so it runs as loralab runs its own recipes (expandable
    # segments); only `seed` keeps the study's caching allocator (it reproduces the OOM at batch 8).
    _SEED.replace(name="seed-sdpa", attn_implementation="sdpa", allocator="expandable",
                  about="the study's recipe with SDPA attention (a what-if)"),
    _LORA_BF16,
    _LORA_BF16.replace(name="lora-bf16-ckpt", gradient_checkpointing="full",
                       about="lora-bf16 with HF's (reentrant) checkpointing on every layer (the memory sweeps)"),
    _HF,
    _HF.replace(name="hf-peft-ckpt", gradient_checkpointing="full", about="hf-peft with HF's checkpointing"),
    _HF.replace(name="hf-peft-liger", liger="on", cross_entropy="liger",
                about="hf-peft + Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy; CUDA)"),
    _HF.replace(name="hf-peft-liger-ckpt", liger="on", cross_entropy="liger", gradient_checkpointing="full",
                about="hf-peft + Liger with HF's checkpointing"),
    # the ablation: fast with one lever changed
    _FAST.replace(name="fast-eager-layers", compile="off", liger="off", about="fast without torch.compile"),
    _FAST.replace(name="fast-liger-no-compile", compile="off", liger="on", about="fast with Liger instead of compile"),
    _FAST.replace(name="fast-compile+liger", compile="on", liger="on", about="fast with compile and Liger"),
    _FAST.replace(name="fast-hf-ce", cross_entropy="hf", about="fast with HF's cross-entropy"),
    _FAST.replace(name="fast-lora-fp32-input", lora_matmul_dtype="adapter", about="fast with peft's fp32 LoRA matmul"),
    _FAST.replace(name="fast-dropout", lora_dropout=0.05, about="fast with LoRA dropout 0.05"),
    _FAST.replace(name="fast-selective-ckpt", gradient_checkpointing="selective", about="fast with selective checkpointing"),
    _FAST.replace(name="fast-full-ckpt", gradient_checkpointing="full", checkpoint_layers=10**6,
                  about="fast with full checkpointing of every layer (loralab's wrapper)"),
    _FAST.replace(name="fast-offload", gradient_checkpointing="offload", checkpoint_layers=8,
                  about="fast with 8 layers' activations offloaded to CPU"),
    _FAST.replace(name="fast-doc-positions", doc_position_ids=True, about="fast with per-document positions"),
    _FAST.replace(name="fast-caching-allocator", allocator="caching", about="fast with PyTorch's caching allocator"),
    _FP8,
    # the FP8 ablation: fast8 with one FP8 lever changed
    _FP8.replace(name="fast8-tensorwise", fp8="tensorwise", about="fast8 with one scale per tensor"),
    _FP8.replace(name="fast8-unfused-shared", fp8_fused=False, about="fast8 with separate q/k/v and gate/up GEMMs, "
                                                                     "their input quantised once"),
    _FP8.replace(name="fast8-unfused-per-gemm", fp8_fused=False, fp8_shared_quant=False,
                 about="fast8 with separate GEMMs, each quantising its own input"),
    _FP8.replace(name="fast8-per-step-wt", fp8_weight_t="per-step", about="fast8 transposing W in every backward "
                                                                           "(no kept W^T: 6 GiB less at 7B)"),
    _FP8.replace(name="fast8-lm-head", fp8_lm_head=True, about="fast8 with the LM head in FP8 too"),
    # what notebook 05 loads the base with to generate summaries (unquantized: merging an adapter into int8/nf4
    # weights would re-quantize them): bf16 on a GPU, fp32 on a CPU, SDPA
    _FAST.replace(name="generate-bf16", about="the base for generating summaries on a GPU (notebook 05)"),
    _FAST.replace(name="generate-fp32", param_dtype="float32", compute_dtype="float32",
                  about="the base for generating summaries on a CPU (notebook 05)"),
)
USER_RECIPES = ("seed", "fast", "fast8", "qlora", "demo")
"""The recipes run_all.py offers first; every other name in RECIPES is a variant for measurements."""


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        variants = ", ".join(n for n in RECIPES if n not in USER_RECIPES)
        raise ConfigError(f"recipe={name!r}: expected one of {', '.join(USER_RECIPES)} (or a variant: {variants})")
    return RECIPES[name]


DEFAULT_NOTEBOOKS = ("00", "01", "02", "03", "04", "05", "06")
TINY_DEFAULTS = {"recipe": "demo", "max_steps": 300}
"""The built-in default (tiny model, CPU): a recipe a small model learns from in seconds, and a step budget that
keeps the whole sweep within minutes. Applied only where the user chose nothing."""


@dataclass
class RunConfig:
    """One run of loralab: what to train, on what, with which recipe, how long, on which devices, which reports.

    ``batch_sizes`` is the sweep; the training of one batch size sees ``cfg.at_batch(b)``, whose
    ``batch_size`` is ``b``. Values are checked on construction (``ConfigError``, one line);
    files (model, tokenizer, data) are checked by the runner before a run folder is made.
    """

    # --- what
    model: str = "tiny"
    """Preset ("tiny", "llama2-7b", "llama2-13b"), a Hugging Face model folder, or a Meta checkpoint folder."""
    tokenizer: str = ""
    """Tokenizer folder or SentencePiece .model file; "": the model's own."""
    data: str = "builtin"
    """"builtin", a SAMSum-style folder (train/val/test), a JSON/JSONL/CSV/Parquet file, or a saved dataset folder."""
    recipe: Recipe | str = ""
    """A recipe (or its name in RECIPES); "": the model's default (demo for the tiny model, seed otherwise)."""
    # --- how much
    batch_sizes: list[int] | str = field(default_factory=lambda: [1, 4, 7, 8])
    """Per-step (per-GPU) batch sizes to sweep, or "auto": the largest that fits, confirmed by a measured step."""
    seq_len: int = 2048
    """Tokens per packed chunk (the study: 2048); the longest row when not packing."""
    packing: bool | None = None
    """None: the recipe's (seed packs, as llama-recipes; demo does not). True: concatenate, cut, drop the
    tail. False: one dialogue per row, padded."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop each training run after this many optimizer steps (epoch time is then extrapolated);
    None: whole epochs (300 for the tiny model's demo recipe)."""
    seed: int = 42
    # --- where
    device: str = "auto"
    """"auto" (cuda when there is one), "cpu" or "cuda"."""
    gpu_memory_gib: float | None = None
    """Cap PyTorch's allocator to emulate a card of this size (40: the study's A100-40GB)."""
    log_every: int = 0
    """Print a progress line every N steps (0: about 20 per run). steps.jsonl has every step."""
    checkpoint_every_min: float = 10.0
    """Save a training checkpoint (adapter, optimizer, scheduler, data position, RNG states) every N minutes of
    training and at the end; 0: only at the end. The last two are kept (bs<N>/checkpoints/)."""
    resume: bool = False
    """Continue an interrupted run in its own folder: notebooks that completed are skipped and a training run
    continues from its last checkpoint (run_all.py --resume RUN_DIR sets it)."""
    # --- several GPUs and nodes (torchrun)
    nproc: int = 1
    """Processes (GPUs) per node; > 1 trains under torchrun. Batch sizes are per GPU."""
    strategy: str = "auto"
    """"ddp" (a replica per GPU), "fsdp" (sharded weights) or "auto" (the memory model decides)."""
    grad_accum: int = 1
    """Gradient accumulation steps; global batch = batch x GPUs x this."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # --- the reports
    notebooks: list[str] = field(default_factory=lambda: list(DEFAULT_NOTEBOOKS))
    """Which notebooks to run (their two-digit prefixes)."""
    eval_examples: int = 50
    """Test dialogues summarised and scored in notebook 05."""
    scaling_reference: str = ""
    """An earlier run folder (same model, recipe, seq_len; fewer GPUs): notebook 06 adds a scaling plot."""
    out: str = "outputs"
    """Parent folder of run folders."""
    run_id: str = ""
    """Run folder name (default: time-model-recipe plus a short unique suffix); never reused."""
    defaults_applied: list[str] = field(default_factory=list)
    """What the user left open and loralab chose (printed by the runner; kept for the record)."""

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            r = dict(self.recipe)
            r["lora_targets"] = tuple(r.get("lora_targets", ("q_proj", "v_proj")))
            self.recipe = Recipe(**r)
        elif isinstance(self.recipe, str):
            self.recipe = get_recipe(self.recipe or ("demo" if self.model == "tiny" else "seed"))
        if self.packing is None:
            self.packing = self.recipe.packing
        if isinstance(self.batch_sizes, int):
            self.batch_sizes = [self.batch_sizes]
        if self.batch_sizes != "auto":
            if not self.batch_sizes:
                raise ConfigError("batch sizes: none given; expected one or more integers >= 1, or 'auto'")
            for b in self.batch_sizes:
                if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                    raise ConfigError(f"batch_size={b!r}: expected an integer >= 1")
        if self.seq_len < 8:
            raise ConfigError(f"seq_len={self.seq_len}: expected an integer >= 8")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: expected an integer >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: expected an integer >= 1 or None")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.checkpoint_every_min < 0:
            raise ConfigError(f"checkpoint_every_min={self.checkpoint_every_min}: expected minutes >= 0 (0: only at the end)")
        if self.log_every < 0:
            raise ConfigError(f"log_every={self.log_every}: expected 0 (auto) or an integer >= 1")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"gpu_memory_gib={self.gpu_memory_gib}: expected a number > 0")
        if self.nproc < 1:
            raise ConfigError(f"nproc={self.nproc}: expected an integer >= 1")
        _choice("strategy", self.strategy, ("auto", "ddp", "fsdp"))
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum={self.grad_accum}: expected an integer >= 1")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"nnodes={self.nnodes}, node_rank={self.node_rank}: expected nnodes >= 1 and 0 <= node_rank < nnodes")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"master_port={self.master_port}: expected a TCP port 1..65535")
        if self.eval_examples < 1:
            raise ConfigError(f"eval_examples={self.eval_examples}: expected an integer >= 1")
        for nb in self.notebooks:
            if not (isinstance(nb, str) and len(nb) == 2 and nb.isdigit()):
                raise ConfigError(f"notebooks: {nb!r}: expected two-digit prefixes such as 00 01 03 06")

    # --- derived values
    @property
    def batch_size(self) -> int:
        """The batch size of one training run (``at_batch``)."""
        if self.batch_sizes == "auto" or len(self.batch_sizes) != 1:
            raise ConfigError(f"batch_sizes={self.batch_sizes!r}: one training run needs one batch size (cfg.at_batch(b))")
        return self.batch_sizes[0]

    def at_batch(self, batch_size: int) -> "RunConfig":
        """This run's config for one batch size of the sweep."""
        return dataclasses.replace(self, batch_sizes=[batch_size], recipe=self.recipe)

    @property
    def world_size(self) -> int:
        """Processes that train: GPUs per node x nodes."""
        return self.nproc * self.nnodes

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def random_weights(self) -> bool:
        from loralab.shape import random_weights

        return random_weights(self.model)

    # --- building and saving
    @classmethod
    def from_options(cls, *, attn: str = "", lora_r: int | None = None, lora_alpha: int | None = None,
                     lora_targets: str | None = None, **options: Any) -> "RunConfig":
        """A run from what a user gave (run_all.py's flags, a notebook's parameters): the defaults filled in
        and listed in ``defaults_applied``. ``attn`` overrides the recipe's attention, ``lora_r`` / ``lora_alpha`` /
        ``lora_targets`` its LoRA settings (``apply_lora_options``); None means unset."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"options {sorted(unknown)}: expected only {sorted(known | {'attn'})}")
        o = {k: v for k, v in options.items() if v is not None}
        notes = []
        model = o.get("model", "tiny")
        if not o.get("recipe"):
            o["recipe"] = TINY_DEFAULTS["recipe"] if model == "tiny" else "seed"
            notes.append(f"recipe {o['recipe']} (the default for {'the tiny model' if model == 'tiny' else 'this model'}; "
                         f"--recipe {'|'.join(USER_RECIPES)} to choose)")
        recipe = o["recipe"] if isinstance(o["recipe"], Recipe) else get_recipe(o["recipe"])
        if attn:
            _choice("attn", attn, ATTENTION)
            recipe = recipe.replace(attn_implementation=attn)
        o["recipe"] = apply_lora_options(recipe, lora_r, lora_alpha, lora_targets)
        if "max_steps" not in o and model == "tiny" and recipe.name == TINY_DEFAULTS["recipe"]:
            o["max_steps"] = TINY_DEFAULTS["max_steps"]
            notes.append(f"at most {o['max_steps']} steps per batch size (the tiny default; --max-steps N to change)")
        return cls(**o, defaults_applied=notes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"]["lora_targets"] = list(self.recipe.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"config keys {sorted(unknown)}: expected only {sorted(known)}")
        return cls(**dict(d))

    def save(self, path: Path) -> Path:
        """Write ``to_dict`` as JSON (atomically)."""
        from loralab.files import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
