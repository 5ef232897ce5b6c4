"""What torchrun runs on every rank: load, wrap (DDP or FSDP2), train, write the usual artifacts.

    torchrun --nproc-per-node 2 -m loralab.train_entry --config-json '{"model": "tiny", ...}' \\
        --out-dir outputs/x/bs4 --strategy ddp --grad-accum 1

Writes, from rank 0, the same files as the single-process path (``steps.jsonl``,
``train_result.json``, ``adapter/``) plus ``setup.json`` (model info, strategy, the
memory model's per-GPU prediction). An out-of-memory error while loading or
sharding the model is a result too (status "oom", step 0).

``--model llama2-13b`` (or any name in ``SHAPES``) builds that shape with random
weights in memory, never on disk: on the meta device, then sharded (FSDP) or
materialised on the GPU, then initialised (normal(0, 0.02), norms 1, LoRA B 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from loralab import distributed as D
from loralab.config import ConfigError, RunConfig

# Meta's Llama-2-13b-hf config.json (shapes only; loralab.model.PRESETS has tiny and llama2-7b)
SHAPES: dict[str, LlamaConfig] = {
    "llama2-13b": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


def say(ctx: D.DistContext, msg: str) -> None:
    if ctx.is_main:
        print(f"[loralab] {msg}", flush=True)


def _init_random_(model, device: torch.device) -> None:
    """Random values for a model materialised with ``to_empty``: weights N(0, 0.02), norms 1, LoRA B 0."""
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
        for m in model.modules():  # RoPE buffers are not parameters: recompute them
            if hasattr(m, "inv_freq") and hasattr(m, "config"):
                fresh = type(m)(m.config).to(device)
                for bname, buf in fresh.named_buffers(recurse=False):
                    setattr(m, bname, buf)


def load_random_shape(cfg: RunConfig, ctx: D.DistContext):
    """(model, info) for a ``SHAPES`` name: built on meta, sharded or materialised, initialised."""
    from loralab.model import DTYPES, add_lora, trainable_parameters
    from transformers import LlamaForCausalLM

    if cfg.recipe.quantization != "none":
        raise ConfigError(f"model {cfg.model!r}: random in-memory shapes support recipes without quantization; got {cfg.recipe.quantization}")
    lc = LlamaConfig.from_dict(SHAPES[cfg.model].to_dict())
    lc._attn_implementation = cfg.recipe.attn_implementation
    lc.use_cache = False
    with torch.device("meta"):
        base = LlamaForCausalLM(lc).to(DTYPES[cfg.recipe.param_dtype])
    model = add_lora(base, cfg.recipe).to("meta")
    if ctx.strategy == "fsdp":
        wrapped = D.wrap_model(model, ctx, cfg.recipe)
    model.to_empty(device=ctx.device)
    torch.manual_seed(cfg.seed + ctx.rank)
    _init_random_(model, ctx.device)
    if ctx.strategy == "ddp":
        wrapped = D.wrap_model(model, ctx, cfg.recipe)
    trainable, total = trainable_parameters(model)
    return wrapped, {"model_folder": None, "random_weights": True, "trainable_params": trainable,
                     "total_params_this_rank": total}


def load(cfg: RunConfig, ctx: D.DistContext):
    """(wrapped model, tokenizer, info) on this rank's device."""
    from loralab.model import (add_lora, load_base_model, resolve_model_folder, resolve_tokenizer_path,
                               trainable_parameters, is_preset, cap_gpu_memory)
    from loralab.tokenizer import load_tokenizer

    cap_gpu_memory(cfg.gpu_memory_gib, ctx.device)
    if ctx.strategy == "fsdp" and cfg.recipe.quantization != "none":
        raise ConfigError(f"strategy='fsdp' with recipe {cfg.recipe.name!r} ({cfg.recipe.quantization}): FSDP shards bf16/fp32 weights only; use --strategy ddp or a recipe without quantization (fast)")
    if cfg.model in SHAPES:
        if not cfg.tokenizer:
            raise ConfigError(f"tokenizer: the {cfg.model} shape has no tokenizer; pass --tokenizer (a Llama 2 tokenizer.model)")
        tok = load_tokenizer(Path(cfg.tokenizer).expanduser())
        model, info = load_random_shape(cfg, ctx)
        return model, tok, info
    if ctx.local_rank == 0:  # build a preset once per node, then everyone loads it
        resolve_model_folder(cfg.model, progress=lambda m: say(ctx, m))
    D.barrier(ctx)
    folder = resolve_model_folder(cfg.model, progress=lambda *a: None)
    tok = load_tokenizer(resolve_tokenizer_path(cfg, folder))
    torch.manual_seed(cfg.seed)
    # FSDP: load on the CPU, fully_shard moves one layer at a time to the GPU and keeps its shard
    base = load_base_model(folder, cfg.recipe, torch.device("cpu") if ctx.strategy == "fsdp" else ctx.device)
    torch.manual_seed(cfg.seed)
    model = add_lora(base, cfg.recipe)
    trainable, total = trainable_parameters(model)
    wrapped = D.wrap_model(model, ctx, cfg.recipe)
    return wrapped, tok, {"model_folder": str(folder), "random_weights": is_preset(cfg.model),
                          "trainable_params": trainable, "total_params": total}


def model_config_of(cfg: RunConfig):
    from loralab.model import is_preset, preset_config, resolve_model_folder

    if cfg.model in SHAPES:
        return LlamaConfig.from_dict(SHAPES[cfg.model].to_dict())
    if is_preset(cfg.model):
        return preset_config(cfg.model)
    return LlamaConfig.from_pretrained(resolve_model_folder(cfg.model, progress=lambda *a: None))


def resolve_strategy(strategy: str, cfg: RunConfig, world_size: int, device: torch.device) -> str:
    """"auto": DDP when the memory model says a replica fits the card (or the cap), else FSDP."""
    if strategy != "auto":
        return strategy
    if device.type != "cuda" or cfg.recipe.quantization != "none":
        return "ddp"
    cap = cfg.gpu_memory_gib or torch.cuda.get_device_properties(device).total_memory / D.GIB
    return D.choose_strategy(model_config_of(cfg), cfg.recipe, cfg.batch_size, cfg.seq_len, world_size, cap,
                             allocator_cap=cfg.gpu_memory_gib is not None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-json", required=True, help="RunConfig.to_dict() as JSON (or @file)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--strategy", default="auto", help="ddp, fsdp or auto")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--inject-oom-ranks", default="", help="tests: comma-separated ranks that fake an OOM")
    p.add_argument("--inject-oom-step", type=int, default=0)
    a = p.parse_args(argv)
    raw = Path(a.config_json[1:]).read_text() if a.config_json.startswith("@") else a.config_json
    cfg = RunConfig.from_dict(json.loads(raw))
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, _, world = D.env_world()
    dev_pref = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    strategy = resolve_strategy(a.strategy, cfg, world, torch.device("cuda", 0) if dev_pref == "cuda" else torch.device("cpu"))
    ctx = D.init(dev_pref, strategy, a.grad_accum)
    try:
        say(ctx, f"{world} rank(s), strategy {strategy}, device {ctx.device} (rank 0)")
        try:
            model, tok, info = load(cfg, ctx)
        except Exception as exc:  # noqa: BLE001 - OOM while loading/sharding is a result
            from loralab.train import is_oom
            if not is_oom(exc):
                raise
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            say(ctx, f"out of memory while loading the model: {err}")
            D.write_rank_record(out_dir, ctx, {"status": "oom", "at_step": 0, "error": err})
            res = {"status": "oom", "batch_size": cfg.batch_size, "steps_done": 0, "losses": [], "error": err,
                   "oom_memory": {"at_step": 0, "phase": "loading the model"}, "world_size": world,
                   "strategy": strategy, "per_gpu_batch_size": cfg.batch_size, "grad_accum": a.grad_accum,
                   "global_batch_size": D.global_batch_size(cfg.batch_size, world, a.grad_accum)}
            if ctx.is_main:
                (out_dir / "train_result.json").write_text(json.dumps(res, indent=1))
            (out_dir / "steps.jsonl").touch()
            return 0 if world == 1 else D.OOM_EXIT_CODE
        from loralab.data import load_splits, tokenize_splits

        split = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)["train"]
        try:
            pred = D.predict_peak_distributed(model_config_of(cfg), cfg.recipe, cfg.batch_size, cfg.seq_len,
                                              world, strategy, device=ctx.device.type)
            info["predicted_peak_gib"] = pred.reserved / D.GIB
            info["predicted_device_gib"] = pred.total / D.GIB
            info["predicted_terms_gib"] = {k: v / D.GIB for k, v in pred.terms.items()}
        except Exception as exc:  # noqa: BLE001 - a model the memory model does not know
            info["prediction_error"] = str(exc)
        if ctx.is_main:
            (out_dir / "setup.json").write_text(json.dumps({**info, "strategy": strategy, "world_size": world,
                                                            "grad_accum": a.grad_accum}, indent=1, default=str))
        inject = None
        if a.inject_oom_ranks:
            inject = ({int(r) for r in a.inject_oom_ranks.split(",")}, a.inject_oom_step)
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        res = D.train_distributed(cfg, model, split, out_dir, pad, ctx, progress=lambda m: say(ctx, m),
                                  inject_oom=inject)
        if ctx.is_main:
            res.update({k: info.get(k) for k in ("predicted_peak_gib", "predicted_device_gib", "random_weights",
                                                 "trainable_params")})
            (out_dir / "train_result.json").write_text(json.dumps(res, indent=1))
            say(ctx, f"done: status {res['status']}, {res['steps_done']} steps")
        return 0
    finally:
        D.teardown(ctx)


if __name__ == "__main__":
    sys.exit(main())
