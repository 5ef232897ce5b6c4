"""Models: presets, loading through ``from_pretrained``, quantization, LoRA, checkpointing.

Every model, preset or not, is a Hugging Face folder on disk and is loaded by
``from_pretrained`` with the recipe's dtype, attention and quantization config,
so int8 / nf4 quantization is the real bitsandbytes path, as with real weights.

Presets (materialised once into ``LORALAB_HOME`` (default ``~/.cache/loralab``)/models/):
- ``tiny``: a 2-layer Llama built locally with its own BPE tokenizer trained on
  the built-in dialogues; runs on a laptop CPU in seconds.
- ``llama2-7b``: the Llama-2-7B shape (hidden 4096, 32 layers, vocab 32000) with
  *random* weights, saved in fp16. Memory, time and FLOPs do not depend on the
  weights' values; summaries and loss values from it mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig

from loralab import allocator
from loralab.config import ConfigError, Recipe, RunConfig

PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
        # Random weights at std 0.1 (Llama's 0.02 is for width 4096): at width 128 they give the
        # frozen base enough signal for LoRA to steer, so the demo learns in seconds (measured:
        # ROUGE-L gap 0.51 at std 0.1 vs none at 0.02 with the same budget).
        initializer_range=0.1,
    ),
    # Meta's Llama-2-7b-hf config.json
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    ),
}
RANDOM_WEIGHT_PRESETS = {"tiny", "llama2-7b"}
PRESET_VERSION = "v2"  # bump when a preset's construction changes (v2: tiny init std 0.1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loralab_home() -> Path:
    return Path(os.environ.get("LORALAB_HOME", Path.home() / ".cache" / "loralab"))


def preset_config(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r}: expected one of {', '.join(PRESETS)} or a model folder")
    return LlamaConfig.from_dict(PRESETS[name].to_dict())


def is_preset(model: str) -> bool:
    return model in PRESETS


def _atomic_folder(final: Path, build) -> Path:
    """Build into a temp folder beside ``final`` and rename: no half-built folder looks complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / "loralab_preset.json").write_text(json.dumps({"complete": True}))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def materialize_preset(name: str, home: Path | None = None, progress=print) -> Path:
    """The preset's HF folder (built on first use, then reused)."""
    cfg = preset_config(name)
    folder = (home or loralab_home()) / "models" / f"{name}-{PRESET_VERSION}"
    if (folder / "loralab_preset.json").exists():
        return folder

    def build(tmp: Path) -> None:
        from transformers import LlamaForCausalLM

        if name == "tiny":
            from loralab.builtin_data import make_builtin_dataset
            from loralab.data import format_prompt
            from loralab.tokenizer import build_word_tokenizer

            train = make_builtin_dataset()["train"]
            build_word_tokenizer([format_prompt(e) for e in train], tmp, vocab_size=cfg.vocab_size)
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() and name != "tiny" else "cpu"
        progress(f"building preset {name!r}: random weights in the {name} shape on {device} -> {folder}")
        dtype = torch.float32 if name == "tiny" else torch.float16
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp, max_shard_size="2GB")
        del model

    return _atomic_folder(folder, build)


def resolve_model_folder(model: str, progress=print) -> Path:
    """A preset name or an HF folder -> the folder to load."""
    if is_preset(model):
        return materialize_preset(model, progress=progress)
    p = Path(model).expanduser()
    if not p.exists():
        raise ConfigError(f"model {model!r}: not a preset ({', '.join(PRESETS)}) and no such folder")
    if not (p / "config.json").exists():
        from loralab import convert
        if convert.is_meta_checkpoint(p):
            return converted_meta_folder(p, progress)
        raise ConfigError(f"model {model!r}: folder has no config.json; expected a Hugging Face model folder, a Meta checkpoint (params.json, consolidated.*.pth) or a preset ({', '.join(PRESETS)})")
    return p


def converted_meta_folder(meta_dir: Path, progress=print) -> Path:
    """A Meta checkpoint converted once to an HF folder under LORALAB_HOME/models (then reused)."""
    import hashlib

    from loralab.convert import convert_meta_checkpoint

    key = hashlib.sha1(str(meta_dir.resolve()).encode()).hexdigest()[:10]
    out = loralab_home() / "models" / f"meta-{meta_dir.resolve().name}-{key}"
    if (out / "config.json").exists():
        return out
    progress(f"converting Meta checkpoint {meta_dir} -> {out} (once)")
    return convert_meta_checkpoint(meta_dir, out, log=progress)


def resolve_tokenizer_path(cfg: RunConfig, model_folder: Path) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser()
    if (model_folder / "tokenizer.json").exists() or (model_folder / "tokenizer.model").exists():
        return model_folder
    raise ConfigError(f"tokenizer: model {cfg.model!r} has no tokenizer of its own; pass --tokenizer (a tokenizer.model file or folder, e.g. Meta's Llama 2 tokenizer.model)")


def resolve_device(device: str) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device; CUDA devices always carry an index (cuda:N)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def cap_gpu_memory(gib: float | None, device: torch.device) -> None:
    """Emulate a card with ``gib`` GiB: caps PyTorch's caching allocator (not the CUDA context)."""
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    frac = gib * 2**30 / total
    if frac > 1:
        raise ConfigError(f"gpu_memory_gib={gib}: larger than this GPU ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(frac, device.index)


def quantization_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    if recipe.quantization == "int8":
        # llama-recipes 2023: load_in_8bit=True with bitsandbytes' defaults (threshold 6.0).
        return BitsAndBytesConfig(load_in_8bit=True)
    if recipe.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[recipe.compute_dtype])
    return None


def load_base_model(folder: Path, recipe: Recipe, device: torch.device):
    """The frozen base model as the recipe wants it, in train mode."""
    import warnings

    from transformers import AutoModelForCausalLM

    # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16: that is the
    # study's real behaviour (int8 matmuls compute in fp16), said once in the reports instead.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill the reports

    allocator.configure(recipe, device)  # before the weights reach the GPU
    qc = quantization_config(recipe)
    kwargs = dict(dtype=DTYPES[recipe.param_dtype], attn_implementation=recipe.attn_implementation)
    if qc is not None:
        kwargs.update(quantization_config=qc, device_map={"": device.index if device.index is not None else torch.cuda.current_device()} if device.type == "cuda" else {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if qc is None:
        model.to(device)
    model.config.use_cache = False
    return model


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


def load_for_training(cfg: RunConfig, progress=print):
    """(peft model on device, tokenizer, info dict) for a RunConfig."""
    from loralab.tokenizer import load_tokenizer

    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.recipe.quantization != "none":
        progress(f"note: {cfg.recipe.quantization} on CPU uses bitsandbytes' CPU kernels (slow; fine for tiny models)")
    cap_gpu_memory(cfg.gpu_memory_gib, device)
    folder = resolve_model_folder(cfg.model, progress=progress)
    tok = load_tokenizer(resolve_tokenizer_path(cfg, folder))
    torch.manual_seed(cfg.seed)
    base = load_base_model(folder, cfg.recipe, device)
    if tok.vocab_size > base.config.vocab_size:
        raise ConfigError(f"tokenizer {tok.source!r}: vocabulary of {tok.vocab_size} exceeds the model's {base.config.vocab_size}; expected a tokenizer made for this model")
    torch.manual_seed(cfg.seed)
    model = add_lora(base, cfg.recipe)
    trainable, total = trainable_parameters(model)
    info = {
        "model_folder": str(folder),
        "random_weights": is_preset(cfg.model),
        "device": str(device),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "checkpointing_active": checkpointing_active(model),
        "attn_implementation": base.config._attn_implementation,
    }
    return model, tok, info
