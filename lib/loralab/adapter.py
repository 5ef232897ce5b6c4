"""The adapter after training: save it, reload it, merge it, export a plain HF model.

A LoRA adapter is a few MB (the study's: 4,194,304 parameters, 16 MiB in fp32)
beside a 13 GB base. Its life after training:

1. ``save_adapter``: the adapter alone (``adapter_config.json`` +
   ``adapter_model.safetensors``), via peft's ``save_pretrained``.
2. ``load_adapter``: into a fresh copy of the same base; outputs must be
   identical to the trained model's.
3. ``merge_adapter``: fold it into the base weights,
   W' = W + (alpha / r) * B @ A   (Hu et al. 2021, "LoRA", eq. 3; peft ``merge_and_unload``),
   so inference costs nothing extra. Logits must match the adapter model's
   up to float rounding (fp32: < 1e-5).
4. ``export_merged``: the merged model as a Hugging Face folder that plain
   ``AutoModelForCausalLM.from_pretrained`` loads, no peft needed.

Quantized bases (int8 / nf4, bitsandbytes; loralab.fp8's FP8 base) are refused by the merge: peft
would dequantize, add B @ A and re-quantize, so the merged weights carry a
second rounding and no longer equal the adapter model. Reload the base in
bf16 or fp32 (recipe quantization "none"), ``load_adapter``, then merge.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from loralab.config import ConfigError
from loralab.files import atomic_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def save_adapter(peft_model, out_dir: str | Path) -> Path:
    """Write the adapter weights and config (not the base) to ``out_dir``; returns the folder."""
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ConfigError(f"save_adapter: got {type(peft_model).__name__}, expected a peft PeftModel")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    return out


def load_adapter(base_model, adapter_dir: str | Path, is_trainable: bool = False):
    """The base model with the adapter from ``adapter_dir`` attached (a PeftModel, eval mode unless trainable).

    ``base_model`` must be the same architecture and weights the adapter was
    trained on; peft wraps it in place (its Linear layers get LoRA branches).
    """
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_dir {str(adapter_dir)!r}: no adapter_config.json there (expected a folder written by save_adapter)")
    return PeftModel.from_pretrained(base_model, str(d), is_trainable=is_trainable)


def quantization_of(model) -> str:
    """"int8", "nf4"/"fp4" (4-bit), "fp8" (loralab.fp8's frozen base) or "none": what quantized layers the model holds."""
    for m in model.modules():
        name = type(m).__name__
        if name == "FP8Linear":
            return "fp8"
        if name in ("Linear8bitLt", "Int8Params"):
            return "int8"
        if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
            return "nf4"
        w = getattr(m, "weight", None)
        if w is not None and type(w).__name__ == "Params4bit":
            return "nf4"
        if w is not None and type(w).__name__ == "Int8Params":
            return "int8"
    return "none"


def merge_adapter(peft_model, inplace: bool = False):
    """The base model with W + (alpha/r) B A folded into its weights (a plain transformers model).

    peft's ``merge_and_unload`` mutates the model it is called on: its base
    layers get the merged weights and the LoRA branches are removed. With
    ``inplace=False`` (default) a deep copy is merged and ``peft_model`` stays
    usable (costs one more copy of the weights in memory); with ``inplace=True``
    ``peft_model`` must not be used afterwards.
    Raises ConfigError for int8/nf4 bases (see module docstring).
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ConfigError(f"merge_adapter: got {type(peft_model).__name__}, expected a peft PeftModel")
    q = quantization_of(peft_model)
    if q != "none":
        raise ConfigError(
            f"merge_adapter: base weights are {q}-quantized; merging would re-quantize them. "
            "Expected a bf16/fp32 base: reload the base with quantization 'none', load_adapter, then merge"
        )
    model = peft_model if inplace else copy.deepcopy(peft_model)
    return model.merge_and_unload()


def export_merged(peft_model, out_dir: str | Path, tokenizer_src: str | Path | None = None,
                  inplace: bool = False) -> Path:
    """Merge and save as a Hugging Face folder (config, safetensors, generation config, tokenizer files).

    Refuses an existing non-empty ``out_dir``. Writes into a temporary sibling
    folder and renames it at the end, so a failed export leaves no half folder.
    ``tokenizer_src``: a tokenizer folder (its tokenizer.json / tokenizer_config.json /
    tokenizer.model / special_tokens_map.json are copied) or a SentencePiece
    ``.model`` file (copied as tokenizer.model).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out_dir {str(out)!r}: exists and is not empty (expected a new or empty folder)")
    src = Path(tokenizer_src) if tokenizer_src else None
    if src is not None and not src.exists():
        raise ConfigError(f"tokenizer_src {str(tokenizer_src)!r}: no such file or folder")
    merged = merge_adapter(peft_model, inplace=inplace)
    with atomic_folder(out) as tmp:  # an empty ``out`` is replaced (a non-empty one was refused above)
        merged.config.use_cache = True  # training turns the KV cache off; inference wants it
        merged.save_pretrained(str(tmp))
        if src is not None:
            if src.is_file():
                shutil.copy2(src, tmp / "tokenizer.model")
            else:
                for name in TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copy2(src / name, tmp / name)
    return out


def compare_logits(a: torch.nn.Module, b: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> float:
    """max |logits_a - logits_b| over a probe batch (fp32 comparison; eval mode, restored after)."""
    out = []
    for m in (a, b):
        was = m.training
        m.eval()
        try:
            dev = next(m.parameters()).device
            with torch.inference_mode():
                kw = {"attention_mask": attention_mask.to(dev)} if attention_mask is not None else {}
                out.append(m(input_ids=input_ids.to(dev), **kw).logits.float().cpu())
        finally:
            m.train(was)
    return float((out[0] - out[1]).abs().max())
