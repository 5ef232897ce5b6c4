"""Models: presets on disk, loading through ``from_pretrained``, random shapes, quantization, LoRA.

Every model that lives on disk (a preset, a Hugging Face folder, a converted Meta checkpoint) is
loaded by ``from_pretrained`` with the recipe's dtype, attention and quantization config, so int8 /
nf4 quantization is the real bitsandbytes path, as with real weights. Which model a name means and
what shape it has: ``loralab.shape``.

Presets on disk are materialised once into ``LORALAB_HOME`` (default ``~/.cache/loralab``)/models/:
built into a hidden temporary folder, checked by loading it, marked complete and renamed, so an
interrupted build never leaves a folder that looks complete. A cached preset that no longer loads
(truncated weights, a full disk) is rebuilt, not reused. In-memory presets (``llama2-13b``) and the
benchmarks' random models are built on the meta device and materialised on the training device by
``build_random_model``: no CPU copy and no disk folder of a large model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from loralab import allocator
from loralab.config import ConfigError, Recipe, RunConfig
from loralab.device import cap_gpu_memory, resolve_device
from loralab.files import atomic_folder
from loralab.shape import (IN_MEMORY_PRESETS, PRESET_MARKER, is_preset, model_config, preset_config,
                           random_weights)

PRESET_VERSION = "v2"  # bump when a preset's construction changes (v2: tiny init std 0.1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loralab_home() -> Path:
    return Path(os.environ.get("LORALAB_HOME", Path.home() / ".cache" / "loralab"))


def _quiet_hf() -> None:
    """No "Loading weights" bars in the reports; bitsandbytes' per-matmul cast warning said once in the reports."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16: that is the study's real
    # behaviour (int8 matmuls compute in fp16), said once in the reports instead.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


# --- presets on disk ---------------------------------------------------------------------------
def preset_folder(name: str, home: Path | None = None) -> Path:
    return (home or loralab_home()) / "models" / f"{name}-{PRESET_VERSION}"


def load_problem(folder: Path) -> str | None:
    """None when the folder's config and every weight file load (safetensors on the meta device: the header is
    read and the data offsets are checked against the file size; a .bin's zip directory is read); else a
    one-line reason naming the file. Cheap: no tensor is loaded."""
    import zipfile

    from safetensors import safe_open

    try:
        model_config(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure means "does not load"
        return _first_line(e)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return "no weights (*.safetensors or *.bin)"
    for index in folder.glob("*.index.json"):
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except Exception as e:  # noqa: BLE001
            return f"{index.name}: {_first_line(e)}"
        missing = sorted(n for n in listed if not (folder / n).is_file())
        if missing:
            return f"{missing[0]}: missing (listed in {index.name})"
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        sf.get_slice(k)[:1]
            else:
                with f.open("rb") as fh:
                    zipped = fh.read(2) == b"PK"  # torch.save's zip format (a legacy pickle is not checked)
                if zipped:
                    zipfile.ZipFile(f).close()
        except Exception as e:  # noqa: BLE001 - any failure means "do not use"
            return f"{f.name}: {_first_line(e)} (truncated or corrupt?)"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]


def cache_bytes_needed(model: str) -> tuple[Path, int] | None:
    """(cache folder, bytes) that using ``model`` will write into the model cache first: a preset not built yet (or
    whose cached copy no longer loads), or a Meta checkpoint not converted yet; None when nothing is to be written."""
    from loralab.shape import param_count

    if model in IN_MEMORY_PRESETS:
        return None
    if is_preset(model):
        folder = preset_folder(model)
        if (folder / PRESET_MARKER).exists() and load_problem(folder) is None:
            return None
        return folder.parent, param_count(preset_config(model)) * (4 if model == "tiny" else 2)
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return None
    meta = sorted(p.glob("consolidated.*.pth"))
    if meta and not (_converted_folder(p) / "config.json").exists():
        return loralab_home() / "models", sum(f.stat().st_size for f in meta)
    return None


def materialize_preset(name: str, home: Path | None = None, progress=print) -> Path:
    """The preset's HF folder: built on first use, then reused while it still loads."""
    if name in IN_MEMORY_PRESETS:
        raise ConfigError(f"model preset {name!r}: built in memory by each process, never on disk")
    cfg = preset_config(name)
    folder = preset_folder(name, home)
    if (folder / PRESET_MARKER).exists():
        why = load_problem(folder)
        if why is None:
            return folder
        progress(f"cached preset {folder} does not load ({why}): rebuilding it")
        shutil.rmtree(folder, ignore_errors=True)
    with atomic_folder(folder, keep_existing=True) as tmp:  # another process may finish first: keep its folder
        from transformers import LlamaForCausalLM

        _quiet_hf()
        if name == "tiny":
            from loralab.builtin_data import make_builtin_dataset
            from loralab.data import format_prompt
            from loralab.tokenizer import build_word_tokenizer

            build_word_tokenizer([format_prompt(e) for e in make_builtin_dataset()["train"]], tmp,
                                 vocab_size=cfg.vocab_size)
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() and name != "tiny" else "cpu"
        progress(f"building preset {name!r}: random weights in the {name} shape on {device} -> {folder}")
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if name == "tiny" else torch.float16)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        model.save_pretrained(tmp, max_shard_size="2GB")
        del model
        why = load_problem(tmp)
        if why is not None:
            raise ConfigError(f"model preset {name!r}: the folder just built does not load ({why}); is {folder.parent} full?")
        (tmp / PRESET_MARKER).write_text(json.dumps({"complete": True, "preset": name}))
    return folder


def _converted_folder(meta_dir: Path) -> Path:
    import hashlib

    key = hashlib.sha1(str(meta_dir.resolve()).encode()).hexdigest()[:10]
    return loralab_home() / "models" / f"meta-{meta_dir.resolve().name}-{key}"


def converted_meta_folder(meta_dir: Path, progress=print) -> Path:
    """A Meta checkpoint converted once to an HF folder under LORALAB_HOME/models (then reused)."""
    from loralab.convert import convert_meta_checkpoint

    out = _converted_folder(meta_dir)
    if (out / "config.json").exists():
        return out
    progress(f"converting Meta checkpoint {meta_dir} -> {out} (once)")
    return convert_meta_checkpoint(meta_dir, out, log=progress)


def resolve_model_folder(model: str, progress=print) -> Path | None:
    """The HF folder to load for a model name (None for an in-memory preset): a preset is built once,
    a Meta checkpoint converted once, an HF folder used as it is."""
    if model in IN_MEMORY_PRESETS:
        return None
    if is_preset(model):
        return materialize_preset(model, progress=progress)
    model_config(model)  # one-line errors for anything that is not a model folder
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return p
    return converted_meta_folder(p, progress)


def resolve_tokenizer_path(cfg: RunConfig, model_folder: Path | None) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser()
    if model_folder is not None and ((model_folder / "tokenizer.json").exists() or (model_folder / "tokenizer.model").exists()):
        return model_folder
    raise ConfigError(f"tokenizer: model {cfg.model!r} has no tokenizer of its own; pass --tokenizer (a tokenizer.model "
                      f"file or folder, e.g. Meta's Llama 2 tokenizer.model)")


def tokenizer_path_for(cfg: RunConfig, progress=print) -> Path:
    """Where the run's tokenizer is, found without building a preset or converting a checkpoint (only the tiny
    preset, seconds on CPU, is built for it): --tokenizer, else the model's own."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser()
    if cfg.model == "tiny":
        return materialize_preset("tiny", progress=progress)  # its tokenizer is built with it
    if is_preset(cfg.model):
        raise ConfigError(f"tokenizer: the {cfg.model} preset has no tokenizer; pass --tokenizer with a Llama 2 "
                          f"tokenizer.model (vocab 32000)")
    folder = Path(cfg.model).expanduser()
    if (folder / "config.json").is_file():
        return resolve_tokenizer_path(cfg, folder)
    from loralab.convert import _find_tokenizer

    return _find_tokenizer(folder)  # a Meta checkpoint's tokenizer.model, the file its conversion copies


def load_tokenizer_for(cfg: RunConfig, progress=print):
    """The run's tokenizer: --tokenizer, else the model's own."""
    from loralab.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path_for(cfg, progress=progress))


# --- the base model ----------------------------------------------------------------------------
def quantization_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    if recipe.quantization == "int8":
        # llama-recipes 2023: load_in_8bit=True with bitsandbytes' defaults (threshold 6.0).
        return BitsAndBytesConfig(load_in_8bit=True)
    if recipe.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[recipe.compute_dtype])
    return None


def load_base_model(folder: Path, recipe: Recipe, device: torch.device):
    """The frozen base model from a folder, as the recipe wants it, in train mode."""
    from transformers import AutoModelForCausalLM

    _quiet_hf()
    allocator.configure(recipe, device)  # before the weights reach the GPU
    qc = quantization_config(recipe)
    kwargs = dict(dtype=DTYPES[recipe.param_dtype], attn_implementation=recipe.attn_implementation)
    if qc is not None:
        where = "cpu" if device.type != "cuda" else (device.index if device.index is not None else torch.cuda.current_device())
        kwargs.update(quantization_config=qc, device_map={"": where})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        if "out of memory" in str(e).lower():
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model {str(folder)!r}: its weights do not load ({msg[:200]})") from None
    if qc is None:
        model.to(device)
    model.config.use_cache = False
    return model


def _init_random_(model, device: torch.device) -> None:
    """Random values for a model materialised with ``to_empty``: weights N(0, 0.02), norms 1, LoRA A
    N(0, 1/in), LoRA B 0; RoPE buffers recomputed (they are not parameters)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            if "lora_B" in name:
                t.zero_()
            elif "norm" in name:
                t.fill_(1.0)
            elif "lora_A" in name:
                t.normal_(0.0, 1.0 / t.shape[-1] ** 0.5)
            else:
                t.normal_(0.0, 0.02)
        for m in model.modules():
            if hasattr(m, "inv_freq") and hasattr(m, "config"):
                fresh = type(m)(m.config).to(device)
                for bname, buf in fresh.named_buffers(recurse=False):
                    setattr(m, bname, buf)


def _quantize_linears(model, recipe: Recipe, device: torch.device) -> None:
    """Swap every decoder nn.Linear for bitsandbytes' int8 (LLM.int8, threshold 6) or NF4 module: the layers
    ``from_pretrained`` makes with a BitsAndBytesConfig."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                if recipe.quantization == "int8":
                    cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.data.to(device, torch.float16))
                    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                              threshold=6.0, device="meta")
                    p = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
                    p.CB, p.SCB = cb, scb
                    new.weight = p
                else:
                    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                            compute_dtype=DTYPES[recipe.compute_dtype], compress_statistics=True,
                                            quant_type="nf4", device="meta")
                    new.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False,
                                                   compress_statistics=True, quant_type="nf4")
                    new = new.to(device)
                setattr(parent, name, new)
    setattr(model, "is_loaded_in_8bit" if recipe.quantization == "int8" else "is_loaded_in_4bit", True)


def build_random_model(config, recipe: Recipe, device: torch.device, seed: int = 0, shard=None):
    """A LoRA model (PeftModel, train mode) with random weights in ``config``'s shape, built on the meta
    device and materialised on ``device``: no CPU copy, no disk folder. ``shard(model) -> module`` (FSDP's
    wrapping) runs on the meta model before it is materialised, so each process only ever holds its shard;
    the sharded module is returned then. Quantized recipes swap the decoder linears for bitsandbytes modules
    after materialising (no sharding then)."""
    import copy

    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(config)
    cfg._attn_implementation = recipe.attn_implementation
    cfg.use_cache = False
    dtype = DTYPES[recipe.param_dtype]
    if recipe.quantization == "int8" and dtype == torch.float32:
        dtype = torch.float16  # the study loaded fp16 then int8; prepare_for_kbit makes the rest fp32
    allocator.configure(recipe, device)  # before the weights reach the GPU
    torch.manual_seed(seed)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg).to(dtype)
    if shard is None:  # materialise the base, then attach LoRA and the levers to real weights (FP8 casts them)
        base.to_empty(device=device)
        _init_random_(base, device)
        if recipe.quantization != "none":
            _quantize_linears(base, recipe, device)
        torch.manual_seed(seed)
        return add_lora(base, recipe)
    if recipe.quantization != "none" or recipe.fp8 != "off":
        raise ConfigError(f"recipe {recipe.name!r}: FSDP shards bf16/fp32 weights only (not int8, nf4 or fp8); "
                          f"use --strategy ddp or the recipe fast")
    model = shard(add_lora(base, recipe))
    model.to_empty(device=device)
    torch.manual_seed(seed)
    _init_random_(model, device)
    return model


# --- LoRA --------------------------------------------------------------------------------------
def enable_checkpointing(model) -> None:
    # Reentrant, as transformers 4.31 (the study's) did by default.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def add_lora(model, recipe: Recipe):
    """Freeze the base, prepare as the recipe says, attach LoRA; returns a PeftModel in train mode."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.quantization != "none" and recipe.prepare_for_kbit:
        # peft's prepare: freeze, cast every non-quantized param to fp32, input grads on.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.gradient_checkpointing == "full" and recipe.checkpoint_layers is None:
        enable_checkpointing(model)  # other variants: loralab.fast's wrapper (apply_levers)
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.lora_targets), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    # from_pretrained returns eval mode; HF skips checkpointing (and dropout) in eval mode.
    model.train()
    from loralab.fast import apply_levers  # the fast recipe's switches; plain recipes: no-ops

    apply_levers(model, recipe)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def checkpointing_active(model) -> bool:
    """True when decoder layers will recompute in backward (flag set and module in train mode)."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def load_for_training(cfg: RunConfig, progress=print, device: torch.device | None = None, shard=None):
    """(PeftModel on the device, tokenizer, info) for a run: a preset, an HF folder, a Meta checkpoint or an
    in-memory shape. ``shard(model) -> module``: FSDP's wrapping (``loralab.distributed.wrap_model``), then
    returned in place of the PeftModel; a folder is loaded on the CPU and sharding moves one layer at a time
    to the GPU."""
    from loralab.tokenizer import load_tokenizer

    device = device or resolve_device(cfg.device)
    if device.type == "cpu" and cfg.recipe.quantization != "none":
        progress(f"note: {cfg.recipe.quantization} on CPU uses bitsandbytes' CPU kernels (slow; fine for tiny models)")
    cap_gpu_memory(cfg.gpu_memory_gib, device)
    folder = resolve_model_folder(cfg.model, progress=progress)
    tok = load_tokenizer(resolve_tokenizer_path(cfg, folder))
    mcfg = model_config(cfg.model) if folder is None else model_config(str(folder))
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer {tok.source!r}: vocabulary of {tok.vocab_size} exceeds the model's "
                          f"{mcfg.vocab_size}; expected a tokenizer made for this model")
    t0 = time.perf_counter()
    if folder is None:
        progress(f"building {cfg.model} with random weights on {device} ...")
        model = build_random_model(mcfg, cfg.recipe, device, seed=cfg.seed, shard=shard)
    else:
        progress(f"loading {folder} ({cfg.recipe.quantization if cfg.recipe.quantization != 'none' else cfg.recipe.param_dtype}) "
                 f"onto {device} ...")
        torch.manual_seed(cfg.seed)
        base = load_base_model(folder, cfg.recipe, torch.device("cpu") if shard is not None else device)
        torch.manual_seed(cfg.seed)
        model = add_lora(base, cfg.recipe)
        if shard is not None:
            model = shard(model)
    trainable, total = trainable_parameters(model)
    size = f"{total / 1e9:.2f} B" if total >= 1e9 else f"{total / 1e6:.1f} M"
    progress(f"model ready in {time.perf_counter() - t0:.1f} s: {size} parameters, {trainable:,} trainable (LoRA)")
    info = {
        "model_folder": None if folder is None else str(folder),
        "random_weights": random_weights(cfg.model),
        "device": str(device),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "checkpointing_active": checkpointing_active(model),
        "attn_implementation": cfg.recipe.attn_implementation,
    }
    return model, tok, info
