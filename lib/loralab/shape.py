"""What shape is this model, and are its weights random: one answer for every notebook and module.

``model_config(model)`` is the one door (litgpt's ``Config.from_name``): a preset name, a Hugging
Face folder (``config.json``; loralab's marker file or not) or a Meta checkpoint folder
(``params.json`` + ``consolidated.*.pth``) gives the model's ``LlamaConfig`` without reading a
single weight. ``random_weights(model)`` says whether the model's weights are random: presets are,
and so is a folder that carries loralab's preset marker (a copy of a preset folder); any other
folder is taken to hold real weights.

``ModelShape`` holds the sizes the memory model (``loralab.memory``) and the FLOPs count
(``loralab.flops``) are written in: H hidden, I intermediate, L layers, V vocab, nh query heads,
nkv key/value heads, hd head size, tied embeddings.

Presets:
- ``tiny``: a 2-layer, 128-wide Llama with its own BPE tokenizer (built once into LORALAB_HOME);
  runs on a laptop CPU in seconds.
- ``llama2-7b``: Meta's Llama-2-7b-hf shape with random weights (built once into LORALAB_HOME, fp16).
- ``llama2-13b``: Meta's Llama-2-13b-hf shape with random weights, built in memory by each process
  (on the meta device, then sharded or materialised): never written to disk.
- ``llama3.1-8b``: Meta's Llama-3.1-8B shape (grouped-query attention, 128,256-token vocabulary), random weights,
  built in memory like ``llama2-13b``; any tokenizer whose ids are below its vocabulary trains it (the planner
  needs none).
Memory, time and FLOPs do not depend on the weights' values; loss and summaries from random weights
mean nothing, and every report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loralab.config import ConfigError, Recipe

PRESET_MARKER = "loralab_preset.json"
"""Written last into a built preset folder: {"complete": true, "preset": name}. Its presence also marks
the folder's weights as random (a copy of a preset folder keeps it)."""


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


def _presets() -> dict:
    return {
        "tiny": _llama(
            vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
            # std 0.1 (Llama's 0.02 is for width 4096): at width 128 the frozen base gives LoRA enough
            # signal to steer, so the demo learns in seconds (ROUGE-L gap 0.51 at 0.1, none at 0.02).
            initializer_range=0.1),
        # Meta's Llama-2-7b-hf config.json
        "llama2-7b": _llama(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        # Meta's Llama-2-13b-hf config.json
        "llama2-13b": _llama(
            vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
            num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        # Meta's Llama-3.1-8B config.json: grouped-query attention (8 K/V heads) and a 128,256-token vocabulary
        "llama3.1-8b": _llama(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            tie_word_embeddings=False),
    }


PRESET_NAMES = ("tiny", "llama2-7b", "llama2-13b", "llama3.1-8b")
IN_MEMORY_PRESETS = ("llama2-13b", "llama3.1-8b")
"""Built on the meta device by every process that trains it (several GPUs with FSDP); never on disk."""


def is_preset(model: str) -> bool:
    return str(model) in PRESET_NAMES


def preset_config(name: str):
    """A fresh copy of a preset's LlamaConfig."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"model preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    return _presets()[name]


def _folder(model: str) -> Path:
    p = Path(str(model)).expanduser()
    if not p.exists():
        raise ConfigError(f"model {str(model)!r}: not a preset ({', '.join(PRESET_NAMES)}) and no such folder")
    if not p.is_dir():
        raise ConfigError(f"model {str(model)!r}: a file; expected a preset ({', '.join(PRESET_NAMES)}), a Hugging Face "
                          f"model folder (config.json) or a Meta checkpoint folder (params.json, consolidated.*.pth)")
    return p


def model_config(model: str):
    """The model's config (no weights read): a preset, an HF folder, or a Meta checkpoint folder."""
    if is_preset(model):
        return preset_config(str(model))
    p = _folder(model)
    if (p / "config.json").is_file():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(p, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any parse error means "not a usable config"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"model {str(model)!r}: config.json does not load ({msg[:200]})") from None
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if getattr(cfg, k, None) is None]
        if missing:
            raise ConfigError(f"model {str(model)!r}: config.json lacks {', '.join(missing)}; expected a Llama-class "
                              f"causal LM (model_type {getattr(cfg, 'model_type', '?')!r})")
        return cfg
    from loralab import convert

    if convert.is_meta_checkpoint(p):
        return convert.config_from_meta(p)
    raise ConfigError(f"model {str(model)!r}: folder has no config.json; expected a Hugging Face model folder, a Meta "
                      f"checkpoint (params.json, consolidated.*.pth) or a preset ({', '.join(PRESET_NAMES)})")


def random_weights(model: str) -> bool:
    """True when the model's weights are random: a preset, or a folder carrying loralab's preset marker."""
    if is_preset(model):
        return True
    p = Path(str(model)).expanduser()
    return (p / PRESET_MARKER).is_file()


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a Llama model's memory and FLOPs (notation of loralab.memory)."""

    H: int
    """hidden size"""
    I: int  # noqa: E741 - the papers' name for the MLP width
    """intermediate (MLP) size"""
    L: int
    """decoder layers"""
    V: int
    """vocabulary"""
    nh: int
    """query heads"""
    nkv: int
    """key/value heads (grouped-query attention when < nh)"""
    hd: int
    """head size"""
    tied: bool
    """LM head shares the embedding matrix"""

    @property
    def Hq(self) -> int:
        return self.nh * self.hd

    @property
    def Hkv(self) -> int:
        return self.nkv * self.hd

    @classmethod
    def of(cls, config) -> "ModelShape":
        """From a ``LlamaConfig`` (or anything with its attribute names) or a model name (``model_config``)."""
        if isinstance(config, (str, Path)):
            config = model_config(str(config))
        nh = config.num_attention_heads
        return cls(H=config.hidden_size, I=config.intermediate_size, L=config.num_hidden_layers,
                   V=config.vocab_size, nh=nh, nkv=getattr(config, "num_key_value_heads", None) or nh,
                   hd=getattr(config, "head_dim", None) or config.hidden_size // nh,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        return {"q_proj": (self.H, self.Hq), "k_proj": (self.H, self.Hkv), "v_proj": (self.H, self.Hkv),
                "o_proj": (self.Hq, self.H), "gate_proj": (self.H, self.I), "up_proj": (self.H, self.I),
                "down_proj": (self.I, self.H)}

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    def total_params(self) -> int:
        """Embeddings + LM head (untied) + L x (linears + 2 norms) + final norm. Llama-2-7B: 6,738,415,616."""
        return self.V * self.H * (1 if self.tied else 2) + self.L * (self.layer_linear_params() + 2 * self.H) + self.H

    def lora_params(self, recipe: Recipe) -> int:
        """sum over layers and target linears of r x (in + out) (Hu et al. 2021: A is r x in, B is out x r).
        Llama-2-7B, r 8 on q_proj and v_proj: 32 x 2 x 8 x (4096 + 4096) = 4,194,304."""
        lin = self.linears()
        return self.L * sum(recipe.lora_r * (lin[t][0] + lin[t][1]) for t in recipe.lora_targets)


def param_count(config) -> int:
    return ModelShape.of(config).total_params()


def lora_param_count(config, recipe: Recipe) -> int:
    return ModelShape.of(config).lora_params(recipe)
