"""Meta Llama 2 checkpoint -> Hugging Face ``LlamaForCausalLM`` folder.

transformers dropped ``convert_llama_weights_to_hf`` in 4.48, so loralab owns
this small converter. Input is Meta's download layout::

    llama-2-7b/params.json            {"dim", "multiple_of", "n_heads", "n_layers", "norm_eps",
                                       "vocab_size" (-1: take it from tokenizer.model),
                                       optional "n_kv_heads", "ffn_dim_multiplier", "rope_theta"}
    llama-2-7b/consolidated.00.pth    one file per model-parallel rank (7B: 1, 13B: 2, 70B: 8)
    tokenizer.model                   in the folder or in its parent (Meta's layout)

Output: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when
larger than ``max_shard_bytes``), ``tokenizer.model`` (copied byte for byte) and
a small ``tokenizer_config.json``. ``loralab.tokenizer.load_tokenizer`` reads the
folder's ``tokenizer.model`` with sentencepiece (exact Llama 2 ids).

The one non-obvious step is RoPE layout. Meta's ``model.py`` rotates adjacent
pairs (x0, x1), (x2, x3), ... of each head as complex numbers; HF's Llama uses
``rotate_half``, which pairs x_i with x_{i + head_dim/2}. So the rows of wq and
wk are reordered per head (source: the removed
``transformers/models/llama/convert_llama_weights_to_hf.py``, ``permute``)::

    w_hf = w_meta.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)

with ``n_heads = n_kv_heads`` for wk (grouped-query attention, 70B). Since q and k
are permuted the same way, q.k per head is unchanged and the logits are equal.

Model-parallel shards are merged as Meta's fairscale layers split them:
column-parallel (wq, wk, wv, w1, w3, output) on dim 0, row-parallel (wo, w2)
on dim 1, ``tok_embeddings`` (ParallelEmbedding) on dim 1, norms replicated.

Memory stays bounded: shards are opened with ``torch.load(mmap=True)`` and
tensors are converted one at a time and written one safetensors file at a time,
so peak RAM is about one output file (``max_shard_bytes``), not the model.
The result is written to a hidden temporary folder next to ``out_dir`` and
renamed at the end, so an interrupted conversion never leaves a folder that
looks complete.

CLI: ``python -m loralab.convert META_DIR OUT_DIR [--dtype float16]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from loralab.config import ConfigError
from loralab.files import atomic_folder

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta name (per layer) -> (HF name, how shards are merged: concat dim or None = replicated, permute with)
LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, "n_heads"),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, "n_kv_heads"),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, None),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, None),
    "attention_norm.weight": ("input_layernorm.weight", None, None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, None),
}
TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
IGNORED_KEYS = {"rope.freqs"}  # precomputed RoPE frequencies in Llama 1/2 files; HF recomputes them


def is_meta_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a folder holding ``params.json`` and at least one ``consolidated.NN.pth``."""
    p = Path(path).expanduser()
    return (p.is_dir() and (p / "params.json").is_file()
            and any(SHARD_RE.match(f.name) for f in p.glob("consolidated.*.pth")))


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """FFN width of Meta's ``FeedForward``: ``int(2 * 4 * dim / 3)``, times the multiplier, rounded up.

    Source: llama/model.py (Meta, Llama 2). 7B: dim 4096, multiple_of 256 -> 11008;
    70B: dim 8192, multiplier 1.3, multiple_of 4096 -> 28672.
    """
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved-RoPE rows -> HF rotate_half rows (see module docstring)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def llama_config(params: dict, sp, max_position_embeddings: int = 4096, torch_dtype=torch.float16,
                 where: Path | str = ""):
    """The Hugging Face ``LlamaConfig`` of Meta's ``params.json`` (``sp``: the checkpoint's SentencePiece model)."""
    from transformers import LlamaConfig

    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ConfigError(f"{Path(where) / 'params.json'}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}: expected dim divisible by n_heads, n_heads by n_kv_heads, and an even head size")
    config = LlamaConfig(
        vocab_size=sp.vocab_size(), hidden_size=dim, num_hidden_layers=n_layers,
        intermediate_size=intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=params["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=None, tie_word_embeddings=False,
        dtype=torch_dtype,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _params_and_tokenizer(meta_dir: Path):
    """(params.json, its SentencePiece model, the tokenizer file), checked against each other."""
    import sentencepiece as spm

    params = _read_params(meta_dir)
    tok_file = _find_tokenizer(meta_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tok_file))
    if params["vocab_size"] not in (-1, sp.vocab_size()):
        raise ConfigError(f"{meta_dir / 'params.json'}: vocab_size {params['vocab_size']} does not match {tok_file} ({sp.vocab_size()} pieces)")
    return params, sp, tok_file


def config_from_meta(meta_dir: str | Path, max_position_embeddings: int = 4096):
    """The ``LlamaConfig`` a Meta checkpoint folder converts to, without reading its weights."""
    meta_dir = Path(meta_dir).expanduser()
    params, sp, _ = _params_and_tokenizer(meta_dir)
    return llama_config(params, sp, max_position_embeddings, where=meta_dir)


def _read_params(meta_dir: Path) -> dict:
    f = meta_dir / "params.json"
    if not f.is_file():
        raise ConfigError(f"meta checkpoint {str(meta_dir)!r}: no params.json (expected Meta's Llama download layout)")
    try:
        params = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in ("dim", "multiple_of", "n_heads", "n_layers", "norm_eps", "vocab_size") if k not in params]
    if missing:
        raise ConfigError(f"{f}: missing {', '.join(missing)} (expected Meta Llama params)")
    return params


def _find_shards(meta_dir: Path) -> list[Path]:
    found = sorted((int(m.group(1)), f) for f in meta_dir.iterdir() if (m := SHARD_RE.match(f.name)))
    if not found:
        raise ConfigError(f"meta checkpoint {str(meta_dir)!r}: no consolidated.*.pth file")
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        raise ConfigError(f"meta checkpoint {str(meta_dir)!r}: shard ranks {ranks}, expected consolidated.00 .. {len(ranks) - 1:02d} without gaps")
    return [f for _, f in found]


def _find_tokenizer(meta_dir: Path) -> Path:
    for f in (meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model"):
        if f.is_file():
            return f
    raise ConfigError(f"meta checkpoint {str(meta_dir)!r}: no tokenizer.model in the folder or its parent")


def _load_shard(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and mmap errors all mean "not a usable checkpoint")
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{f}: cannot read as a torch checkpoint ({msg})") from None


def _plan_files(names_shapes: list[tuple[str, tuple]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into files of at most ``max_bytes`` (one oversize tensor gets its own)."""
    files: list[list[str]] = [[]]
    size = 0
    for name, shape in names_shapes:
        n = itemsize * int(torch.Size(shape).numel())
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files


def convert_meta_checkpoint(
    meta_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    max_position_embeddings: int = 4096,
    max_shard_bytes: int = 5 * 10**9,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Convert a Meta Llama 2 checkpoint folder to a Hugging Face folder at ``out_dir``; return it.

    ``dtype``: float16 (default, as the old HF script), bfloat16 or float32.
    ``max_position_embeddings``: 4096 for Llama 2, 2048 for Llama 1 (params.json does not say).
    ``max_shard_bytes``: largest safetensors file; also bounds peak RAM.
    ``log``: called with one progress line per step (per layer); None for silence.
    Raises ConfigError (one line) for bad input, or if ``out_dir`` exists and is not empty.
    """
    say = log or (lambda _msg: None)
    meta_dir, out_dir = Path(meta_dir).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if not meta_dir.is_dir():
        raise ConfigError(f"meta checkpoint {str(meta_dir)!r}: no such folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out_dir {str(out_dir)!r}: exists and is not empty (a conversion never overwrites; pick a new folder)")
    params, sp, tok_file = _params_and_tokenizer(meta_dir)
    shard_files = _find_shards(meta_dir)
    vocab = sp.vocab_size()
    config = llama_config(params, sp, max_position_embeddings, torch_dtype=DTYPES[dtype], where=meta_dir)
    dim, n_heads, n_layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    n_kv_heads, head_dim, ffn = config.num_key_value_heads, dim // n_heads, config.intermediate_size
    heads = {"n_heads": n_heads, "n_kv_heads": n_kv_heads}
    layer_shapes = {
        "attention.wq.weight": (dim, dim), "attention.wk.weight": (n_kv_heads * head_dim, dim),
        "attention.wv.weight": (n_kv_heads * head_dim, dim), "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
        "feed_forward.w3.weight": (ffn, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
    }
    top_shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}

    say(f"reading {len(shard_files)} shard(s) from {meta_dir} (mmap); tokenizer {tok_file} ({vocab} pieces)")
    shards = [_load_shard(f) for f in shard_files]
    expected = set(top_shapes) | {f"layers.{i}.{k}" for i in range(n_layers) for k in layer_shapes}
    for f, sd in zip(shard_files, shards):
        if not isinstance(sd, dict):
            raise ConfigError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
        missing = sorted(expected - set(sd))
        extra = sorted(set(sd) - expected - IGNORED_KEYS)
        if missing:
            raise ConfigError(f"{f}: missing {len(missing)} tensor(s), first {missing[0]!r} (params.json says n_layers={n_layers})")
        if extra:
            raise ConfigError(f"{f}: {len(extra)} unexpected tensor(s), first {extra[0]!r} (expected a Meta Llama checkpoint)")

    def merged(meta_name: str, cat_dim: int | None, shape: tuple) -> torch.Tensor:
        parts = [sd[meta_name] for sd in shards]
        t = parts[0] if cat_dim is None or len(parts) == 1 else torch.cat(parts, dim=cat_dim)
        if tuple(t.shape) != shape:
            if meta_name == "tok_embeddings.weight" and t.shape[0] != vocab:
                raise ConfigError(f"{meta_dir}: tok_embeddings has {t.shape[0]} rows, tokenizer.model has {vocab} pieces (vocab_size mismatch)")
            raise ConfigError(f"{meta_dir}: {meta_name} merged from {len(shards)} shard(s) has shape {tuple(t.shape)}, expected {shape} from params.json")
        return t

    # Conversion plan, in HF order: hf name -> (meta name, cat dim, permute heads or None, shape).
    plan: dict[str, tuple[str, int | None, int | None, tuple]] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 1, None, top_shapes["tok_embeddings.weight"])}
    for i in range(n_layers):
        for k, (hf, cat_dim, perm) in LAYER_MAP.items():
            plan[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{k}", cat_dim, heads[perm] if perm else None, layer_shapes[k])
    plan["model.norm.weight"] = ("norm.weight", None, None, top_shapes["norm.weight"])
    plan["lm_head.weight"] = ("output.weight", 0, None, top_shapes["output.weight"])

    torch_dtype = DTYPES[dtype]
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    files = _plan_files([(n, p[3]) for n, p in plan.items()], itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))])

    with atomic_folder(out_dir) as tmp:  # an empty out_dir is replaced; a non-empty one was refused above
        from safetensors.torch import save_file
        from transformers import GenerationConfig

        weight_map, total, n_params, layers_done = {}, 0, 0, -1
        for fname, group in zip(names, files):
            tensors = {}
            for hf_name in group:
                meta_name, cat_dim, perm, shape = plan[hf_name]
                t = merged(meta_name, cat_dim, shape).to(torch_dtype)
                if perm is not None:
                    t = permute_rope(t, perm)
                tensors[hf_name] = t.contiguous()
                weight_map[hf_name] = fname
                n_params += t.numel()
                total += t.numel() * itemsize
                if hf_name.endswith("post_attention_layernorm.weight"):  # last tensor of a layer
                    layers_done += 1
                    say(f"layer {layers_done + 1}/{n_layers} converted")
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            say(f"wrote {fname} ({sum(t.numel() for t in tensors.values()) * itemsize / 2**30:.2f} GiB)")
            del tensors
        if len(names) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

        bos, eos = sp.bos_id(), sp.eos_id()
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        shutil.copyfile(tok_file, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": sp.id_to_piece(bos), "eos_token": sp.id_to_piece(eos),
            "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": None,
            "add_bos_token": True, "add_eos_token": False, "legacy": True,
            "model_max_length": max_position_embeddings, "clean_up_tokenization_spaces": False,
        }, indent=2))
        del shards
    say(f"converted {meta_dir} -> {out_dir}: {n_params / 1e6:,.1f} M parameters, "
        f"{total / 2**30:.2f} GiB {dtype} in {len(names)} file(s), vocab {vocab}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loralab.convert", description=__doc__.splitlines()[0])
    ap.add_argument("meta_dir", help="Meta checkpoint folder (params.json, consolidated.NN.pth)")
    ap.add_argument("out_dir", help="new or empty folder for the Hugging Face checkpoint")
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--max-position-embeddings", type=int, default=4096, help="4096 for Llama 2, 2048 for Llama 1")
    args = ap.parse_args(argv)
    try:
        convert_meta_checkpoint(args.meta_dir, args.out_dir, dtype=args.dtype,
                                max_position_embeddings=args.max_position_embeddings, log=print)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
