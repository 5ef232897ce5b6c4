"""The fast recipe side by side with today's libraries: one command, one GPU, same data, same steps.

    . benchmarks/gpu_env.sh && python benchmarks/compare.py                 # H200: ~7 min
    python benchmarks/compare.py --ablation                                  # H200: the levers, ~7 min
    python benchmarks/compare.py --smoke --out /tmp/compare-smoke            # CPU, tiny model, ~2 min

Llama-2-7B shape, random weights built on the GPU (speed and memory do not depend on the
values), 2048-token packed SAMSum chunks (``LORALAB_SAMSUM_DIR`` + ``LORALAB_LLAMA2_TOKENIZER``;
without them: random token ids, said so in the output). Methods, each in its own process
(memory, compile caches and Liger's monkey patches stay isolated):

  seed        the study's recipe: int8 base (bitsandbytes), fp32 rest, eager attention, checkpointing
  hf          plain HF + PEFT LoRA in bf16, SDPA, as a user writes it (dropout 0.05, peft's fp32 adapters)
  hf_ckpt     the same with HF gradient checkpointing
  liger       hf + Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy): Axolotl/TRL's switch
  liger_ckpt  the same with checkpointing
  fast        loralab's ``fast`` recipe (loralab.fast; with checkpointing of as few layers as the cap needs)
  fast8       fast with a frozen FP8 base (loralab.fp8; ``--only fast,fast8``; GPUs with FP8 tensor cores)

Per method and memory cap (``torch.cuda.set_per_process_memory_fraction``: 40 and 24 GiB): the
best batch size (probe steps at batch 1 and 2, extrapolate the peak linearly, confirm, step down
on out-of-memory; at most ``--max-batch``), then warm-up + timed steps from the same LoRA init:
tokens/s, peak memory, MFU (analytic model FLOPs, ``loralab.flops``) against the data-sheet bf16
peak and against the matmul peak measured here, the losses of those steps. A correctness guard
runs the first ``--guard-steps`` steps at batch 1 on the same chunks for hf (dropout off), liger
and fast: per-step losses must agree within 1 %, gradient norms be non-zero. JSON and a
markdown table go to ``--out`` after every method, so a timeout still leaves data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from loralab import fast as FAST
from loralab.environment import gpu_info  # noqa: E402
from loralab.train import is_oom  # noqa: E402
from loralab import flops as F
from loralab.config import ConfigError, Recipe, get_recipe

GIB = 2**30
MAIN = ["hf", "fast", "liger", "hf_ckpt", "liger_ckpt", "seed"]
BAR = {"40": {"hf": 1.5, "liger": 1.1, "seed": 12.0}, "24": {"hf_or_liger": 1.2}}


def method_recipes() -> dict[str, Recipe]:
    fast = get_recipe("fast")
    hf = fast.replace(name="hf-peft-bf16", lora_dropout=0.05, cross_entropy="hf", liger="off", compile="off",
                      lora_matmul_dtype="adapter", allocator="caching")  # as a user runs it
    liger = hf.replace(name="hf-peft-liger", liger="on", cross_entropy="liger")
    return {
        "seed": get_recipe("seed"),
        "hf": hf,
        "hf_ckpt": hf.replace(name="hf-peft-bf16-ckpt", gradient_checkpointing="full"),
        "liger": liger,
        "liger_ckpt": liger.replace(name="hf-peft-liger-ckpt", gradient_checkpointing="full"),
        "fast": fast,
        # ablation: the fast recipe with one lever changed
        "fast-eager-layers": fast.replace(name="fast-eager-layers", compile="off", liger="off"),
        "fast-liger-no-compile": fast.replace(name="fast-liger-no-compile", compile="off", liger="on"),
        "fast-compile+liger": fast.replace(name="fast-compile+liger", compile="on", liger="on"),
        "fast-hf-ce": fast.replace(name="fast-hf-ce", cross_entropy="hf"),
        "fast-lora-fp32-input": fast.replace(name="fast-lora-fp32-input", lora_matmul_dtype="adapter"),
        "fast-dropout": fast.replace(name="fast-dropout", lora_dropout=0.05),
        "fast-selective-ckpt": fast.replace(name="fast-selective-ckpt", gradient_checkpointing="selective"),
        "fast-full-ckpt": fast.replace(name="fast-full-ckpt", gradient_checkpointing="full", checkpoint_layers=10**6),
        "fast-offload": fast.replace(name="fast-offload", gradient_checkpointing="offload", checkpoint_layers=8),
        "fast-doc-positions": fast.replace(name="fast-doc-positions", doc_position_ids=True),
        "fast-caching-allocator": fast.replace(name="fast-caching-allocator", allocator="caching"),
        # a frozen FP8 base (loralab.fp8; FP8 tensor cores only): fast8 and its memory-lean variant
        "fast8": get_recipe("fast8"),
        "fast8-per-step-wt": get_recipe("fast8").replace(name="fast8-per-step-wt", fp8_weight_t="per-step"),
    }


ABLATION = ["fast", "fast-eager-layers", "fast-liger-no-compile", "fast-compile+liger", "fast-hf-ce",
            "fast-lora-fp32-input", "fast-dropout", "fast-selective-ckpt", "fast-full-ckpt", "fast-offload",
            "fast-doc-positions", "fast-caching-allocator"]
GUARD = {"hf", "liger", "fast", "fast8"}
CKPT_SEARCH = {"fast", "fast8"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)




# =================================================================== worker (one method, one process)

class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.dev = torch.device(spec["device"])
        if self.dev.type == "cuda" and self.dev.index is None:  # caps and stats need cuda:N
            self.dev = torch.device("cuda", torch.cuda.current_device())
        r = dict(spec["recipe"])
        r["lora_targets"] = tuple(r["lora_targets"])
        self.recipe = Recipe(**r)
        self.chunks = torch.load(spec["chunks"])
        self.seq = self.chunks.shape[1]
        self.out = Path(spec["result"])
        self.res: dict = {"method": spec["method"], "recipe": spec["recipe"], "caps": {}, "errors": [], "notes": []}

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, self.out)

    # ---------------------------------------------------------- memory
    def set_cap(self, gib: float | None) -> None:
        gc.collect()
        if self.dev.type != "cuda":
            return
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (gib * GIB / total) if gib else 1.0), self.dev)

    def peaks(self) -> dict:
        if self.dev.type != "cuda":
            return {"peak_allocated_gib": None, "peak_reserved_gib": None, "device_used_gib": None}
        free, total = torch.cuda.mem_get_info(self.dev)
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(self.dev) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(self.dev) / GIB,
                "device_used_gib": (total - free) / GIB}

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)  # CPU-GPU sync: step times include the GPU's work

    # ---------------------------------------------------------- model
    def build(self) -> None:
        from loralab.model import add_lora, load_base_model, preset_config
        from loralab.profilers import build_lora_model

        t0 = time.perf_counter()
        self.cfg = preset_config(self.spec["preset"])
        if self.spec.get("model_folder"):
            base = load_base_model(Path(self.spec["model_folder"]), self.recipe, self.dev)
            torch.manual_seed(self.spec["seed"])
            self.model = add_lora(base, self.recipe)
            self.cfg = base.config
        else:
            self.model = build_lora_model(self.cfg, self.recipe, self.dev, seed=self.spec["seed"])
        self.sync()
        self.res["build_s"] = time.perf_counter() - t0
        self.res["levers"] = dict(getattr(self.model, "loralab_levers", {}))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init_state = [p.detach().clone() for p in self.params]
        self.compiled = self.res["levers"].get("compile", "").startswith("on")
        log(f"{self.spec['method']}: built in {self.res['build_s']:.1f} s; levers {self.res['levers']}")

    def restore(self):
        with torch.no_grad():
            for p, s in zip(self.params, self.init_state):
                p.copy_(s)
                p.grad = None
        return torch.optim.AdamW(self.params, lr=self.recipe.learning_rate, weight_decay=self.recipe.weight_decay)

    def batch(self, start: int, bs: int) -> dict:
        idx = [(start + i) % self.chunks.shape[0] for i in range(bs)]
        ids = self.chunks[idx].to(self.dev)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(self, opt, batch, grad_norm: bool = False):
        loss = FAST.forward_loss(self.model, batch, self.recipe)
        loss.backward()
        gn = None
        if grad_norm:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in self.params if p.grad is not None]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), gn

    def safe_step(self, opt, batch, grad_norm=False):
        """One step; a non-OOM failure of torch.compile or of Liger's fused loss falls back once and retries."""
        try:
            return self.step(opt, batch, grad_norm)
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                raise
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            opt.zero_grad(set_to_none=True)
            if self.compiled:
                self.res["errors"].append(f"torch.compile failed, ran eager instead: {err}")
                log(f"compile failed ({err}); falling back to eager layers")
                torch._dynamo.reset()
                cur = getattr(FAST.base_causal_lm(self.model), "_loralab_layers", {})  # keep its checkpointing
                FAST.configure_layers(self.model, compile=False, checkpointing=cur.get("checkpointing", "none"),
                                      checkpoint_layers=cur.get("checkpoint_layers"))
                self.compiled = False
                self.res["levers"]["compile"] = "failed -> off"
                return self.step(opt, batch, grad_norm)
            if self.recipe.cross_entropy == "liger":
                self.res["errors"].append(f"Liger fused linear CE failed, used HF's loss: {err}")
                log(f"liger fused CE failed ({err}); falling back to HF's loss")
                from transformers.models.llama import modeling_llama
                lm = FAST.base_causal_lm(self.model)
                lm.__dict__.pop("forward", None)
                modeling_llama.LlamaForCausalLM.forward = self.orig_forward
                self.recipe = self.recipe.replace(cross_entropy="hf")
                self.res["levers"]["liger"] += " (fused CE failed -> HF loss)"
                return self.step(opt, batch, grad_norm)
            raise

    def cleanup_after_oom(self, opt) -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------- guard
    def guard(self, n: int) -> None:
        drop = [m for name, m in self.model.named_modules() if name.split(".")[-2:-1] == ["lora_dropout"]
                and isinstance(m, torch.nn.Dropout)]
        saved = [m.p for m in drop]
        for m in drop:
            m.p = 0.0  # the guard compares the math: dropout off for every method
        opt = self.restore()
        losses, norms = [], []
        t0 = time.perf_counter()
        for i in range(n):
            loss, gn = self.safe_step(opt, self.batch(i, 1), grad_norm=True)
            losses.append(loss)
            norms.append(gn)
        self.sync()
        self.res["guard"] = {"steps": n, "batch_size": 1, "losses": [float(x) for x in losses],
                             "grad_norms": [float(x) for x in norms], "seconds": time.perf_counter() - t0,
                             "dropout_disabled_modules": len(drop)}
        for m, p in zip(drop, saved):
            m.p = p
        log(f"guard: {n} steps, loss {self.res['guard']['losses'][0]:.4f} -> {self.res['guard']['losses'][-1]:.4f}")

    # ---------------------------------------------------------- measurement
    def probe(self, bs: int) -> dict:
        """One step at batch bs from the init: its peak memory, or {'oom': True}."""
        opt = self.restore()
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        t0 = time.perf_counter()
        try:
            self.safe_step(opt, self.batch(0, bs))
            self.sync()
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            del opt
            self.cleanup_after_oom(None)
            return {"batch_size": bs, "oom": True}
        out = {"batch_size": bs, "oom": False, "seconds": time.perf_counter() - t0, **self.peaks()}
        del opt
        return out

    def timed(self, bs: int, warmup: int, steps: int) -> dict:
        opt = self.restore()
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        times, losses = [], []
        try:
            for i in range(warmup + steps):
                b = self.batch(i * bs, bs)
                self.sync()
                t0 = time.perf_counter()
                loss, _ = self.safe_step(opt, b)
                self.sync()
                times.append(time.perf_counter() - t0)
                losses.append(loss)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            self.cleanup_after_oom(opt)
            return {"oom": True, "batch_size": bs, "oom_at_step": len(times) + 1}
        steady = times[warmup:]
        st = sum(steady) / len(steady)
        out = {"oom": False, "batch_size": bs, "tokens_per_step": bs * self.seq, "step_time_s": st,
               "tokens_per_s": bs * self.seq / st, "step_times_s": times, "first_step_s": times[0],
               "losses": [float(x) for x in losses], **self.peaks()}
        del opt
        return out

    def mfu(self, r: dict) -> None:
        rec = self.recipe
        if rec.gradient_checkpointing != "full" or rec.checkpoint_layers is not None:
            rec = rec.replace(gradient_checkpointing="none")  # non-reentrant: no input grads, recompute not model FLOPs
        m = F.sweep_metrics(self.cfg, rec, r["batch_size"], self.seq, r["step_time_s"], self.spec.get("peak_sheet"))
        r.update(flops_per_step=m["flops_per_step"], tflops_per_s=m["tflops_per_s"], mfu=m["mfu"],
                 peak_tflops_datasheet=self.spec.get("peak_sheet"), peak_tflops_measured=self.spec.get("peak_measured"))
        pm = self.spec.get("peak_measured")
        r["mfu_measured_peak"] = m["tflops_per_s"] / pm if pm else None
        p8 = self.spec.get("peak_measured_fp8")  # FP8 recipes: their frozen GEMMs run at the FP8 rate
        r["mfu_measured_fp8_peak"] = m["tflops_per_s"] / p8 if p8 and getattr(rec, "fp8", "off") != "off" else None

    def predicted(self, bs: int) -> float | None:
        """The analytic memory model's peak (allocator view) where it models the recipe, else None."""
        r = self.recipe
        if (r.cross_entropy != "hf" or self.compiled or r.liger != "off" or r.gradient_checkpointing not in ("none", "full")
                or r.checkpoint_layers is not None or r.lora_matmul_dtype != "adapter"):
            return None
        try:
            from loralab.memory import predict_peak
            return predict_peak(self.cfg, r, bs, self.seq).reserved / GIB
        except Exception as e:  # noqa: BLE001 - the memory model is another module's; never fatal here
            self.res["notes"].append(f"memory.predict_peak failed: {type(e).__name__}: {e}")
            return None

    def run_cap(self, cap: float | None) -> dict:
        key = str(int(cap)) if cap else "none"
        self.set_cap(cap)
        sp = self.spec
        warm, steps, maxb = sp["warmup"], sp["steps"], sp["max_batch"]
        margin = max(0.75, 0.04 * cap) if cap else 0.0
        res: dict = {"cap_gib": cap, "probes": [], "checkpointing": "as recipe"}
        probes = self.res.setdefault("_probes", {})
        if "1" not in probes:
            probes["1"] = self.probe(1)
            res["probes"].append(probes["1"])
        p1 = probes["1"]
        if p1["oom"] or (cap and p1["peak_allocated_gib"] + margin > cap):
            p = self.probe(1) if not p1["oom"] else p1
            res["probes"].append(p)
            if p["oom"] or (p["peak_reserved_gib"] or 0) > cap:
                if sp["method"] in CKPT_SEARCH:
                    return self.ckpt_search(cap, margin, res)
                res.update(status="oom", batch_size=0, note="batch 1 does not fit")
                return res
            cands = [1]
        else:
            if maxb >= 2 and "2" not in probes:
                probes["2"] = self.probe(2)
                res["probes"].append(probes["2"])
            p2 = probes.get("2")
            if p2 is None or p2["oom"]:
                cands = [1]
            elif p2["peak_allocated_gib"] is None:  # CPU: no allocator to read; the largest allowed
                cands = list(range(maxb, 0, -1))
            else:
                slope = max(p2["peak_allocated_gib"] - p1["peak_allocated_gib"], 1e-3)
                bmax = 1 + math.floor(((cap or 1e9) - margin - p1["peak_allocated_gib"]) / slope)
                bmax = max(1, min(maxb, bmax))
                res["slope_gib_per_row"] = slope
                cands = list(range(bmax, 0, -1))
        for b in cands:
            r = self.timed(b, warm, steps)
            if not r["oom"]:
                res.update(status="ok", **r)
                res["predicted_peak_reserved_gib"] = self.predicted(b)
                self.mfu(res)
                return res
            res["probes"].append({"batch_size": b, "oom": True, "during": "timed run"})
            log(f"  batch {b}: out of memory, stepping down")
        if sp["method"] in CKPT_SEARCH:
            return self.ckpt_search(cap, margin, res)
        res.update(status="oom", batch_size=0)
        return res

    def ckpt_search(self, cap: float, margin: float, res: dict) -> dict:
        """fast under a tight cap: full (non-reentrant) checkpointing of as few decoder layers as fit, batch 1."""
        L = len(FAST.decoder_layers(self.model))
        p_none = self.res["_probes"].get("1", {})
        FAST.configure_layers(self.model, compile=self.compiled, checkpointing="full", checkpoint_layers=L)
        pf = self.probe(1)
        res["probes"].append({**pf, "checkpoint_layers": L})
        if pf["oom"]:
            FAST.configure_layers(self.model, compile=self.compiled)
            res.update(status="oom", batch_size=0, note="batch 1 does not fit even with all layers checkpointed")
            return res
        if not p_none.get("oom", True):
            per_layer = max((p_none["peak_allocated_gib"] - pf["peak_allocated_gib"]) / L, 1e-3)
            n = math.ceil((p_none["peak_allocated_gib"] + margin - cap) / per_layer) + 1
        else:
            n = L // 2
        n = max(1, min(L, n))
        while True:
            FAST.configure_layers(self.model, compile=self.compiled, checkpointing="full", checkpoint_layers=n)
            r = self.timed(1, self.spec["warmup"], self.spec["steps"])
            if not r["oom"] or n >= L:
                break
            res["probes"].append({"batch_size": 1, "oom": True, "checkpoint_layers": n, "during": "timed run"})
            n = min(L, n + max(2, L // 8))
        FAST.configure_layers(self.model, compile=self.compiled)
        if r["oom"]:
            res.update(status="oom", batch_size=0)
            return res
        res.update(status="ok", checkpointing=f"full on {n} of {L} layers (non-reentrant)", checkpoint_layers=n, **r)
        self.mfu(res)
        return res

    def run(self) -> None:
        torch.manual_seed(self.spec["seed"])
        caps = self.spec["caps"] or [None]
        self.set_cap(caps[0])
        if self.recipe.cross_entropy == "liger":
            from transformers.models.llama import modeling_llama
            self.orig_forward = modeling_llama.LlamaForCausalLM.forward
        FAST.COMPILE_OPTIONS = {"dynamic": True}  # one compile for every batch size probed
        try:
            self.build()
        except ConfigError as e:
            self.res["status"] = f"unavailable: {e}"
            log(f"{self.spec['method']}: {e}")
            self.save()
            return
        self.save()
        if self.spec["method"] in GUARD and self.spec["guard_steps"]:
            self.guard(self.spec["guard_steps"])
            self.save()
        for cap in caps:
            key = str(int(cap)) if cap else "none"
            t0 = time.perf_counter()
            r = self.run_cap(cap)
            r["seconds"] = time.perf_counter() - t0
            self.res["caps"][key] = r
            if r.get("status") == "ok":
                log(f"{self.spec['method']} cap {key} GiB: batch {r['batch_size']}, {r['tokens_per_s']:,.0f} tok/s, "
                    f"peak alloc {r['peak_allocated_gib'] or 0:.1f} GiB, MFU {100 * (r['mfu'] or 0):.1f} %"
                    f"  ({r['checkpointing']}, {r['seconds']:.0f} s)")
            else:
                log(f"{self.spec['method']} cap {key} GiB: {r.get('status')} {r.get('note', '')}")
            self.save()
        self.res["status"] = "ok"
        self.save()


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    w = Worker(spec)
    try:
        w.run()
    except Exception as e:  # noqa: BLE001 - recorded, the parent goes on
        w.res["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
        w.res["traceback"] = traceback.format_exc()[-3000:]
        w.save()
        traceback.print_exc()
        return 1
    return 0


# =================================================================== parent

def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    import importlib.metadata as md
    for p in ("transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            out[p] = md.version(p)
        except Exception:  # noqa: BLE001
            out[p] = "not installed"
    return out




def load_chunks(args, seq: int, n: int) -> tuple[torch.Tensor, str]:
    """n packed chunks of seq tokens: SAMSum's first train chunks (llama-recipes packing) if found."""
    from loralab.data import load_splits, pack, prompt_ids
    from loralab.tokenizer import load_tokenizer

    if args.smoke:
        from loralab.model import materialize_preset
        tok = load_tokenizer(materialize_preset("tiny", progress=log))
        examples, what = load_splits("builtin")["train"], "loralab built-in dialogues, tiny preset tokenizer"
    else:
        tok_path = args.tokenizer or os.environ.get("LORALAB_LLAMA2_TOKENIZER", "")
        data = args.data or os.environ.get("LORALAB_SAMSUM_DIR", "")
        if not (tok_path and Path(tok_path).exists()):
            g = torch.Generator().manual_seed(0)
            return (torch.randint(3, 32000, (n, seq), generator=g),
                    "random token ids (no Llama 2 tokenizer: set LORALAB_LLAMA2_TOKENIZER and LORALAB_SAMSUM_DIR)")
        tok = load_tokenizer(tok_path)
        if data and Path(data).exists():
            examples, what = load_splits(data)["train"], f"SAMSum train ({data}), Llama 2 tokenizer, packed {seq}"
        else:
            examples, what = load_splits("builtin")["train"], "loralab built-in dialogues, Llama 2 tokenizer (no SAMSum found)"
    seqs, total = [], 0
    for ex in examples:  # the first chunks of the full packing: tokenize only as far as needed
        s = prompt_ids(tok, ex)
        seqs.append(s)
        total += len(s)
        if total >= n * seq + seq:
            break
    rows = pack(seqs, seq)
    if not rows:
        raise ConfigError(f"seq_len={seq}: the data gives no chunk of this length")
    t = torch.tensor(rows, dtype=torch.long)
    if t.shape[0] < n:
        t = t.repeat(math.ceil(n / t.shape[0]), 1)[:n]
    return t[:n], what + f" ({len(rows)} distinct chunks used)"


def best(rows: dict, names: list[str], cap: str):
    got = [(rows[n]["caps"][cap]["tokens_per_s"], n) for n in names
           if n in rows and rows[n].get("caps", {}).get(cap, {}).get("status") == "ok"]
    return max(got) if got else (None, None)


def verdicts(res: dict) -> dict:
    rows = res["methods"]
    out: dict = {}
    for cap in ("40", "24"):
        f = rows.get("fast", {}).get("caps", {}).get(cap, {})
        if f.get("status") != "ok":
            continue
        ft = f["tokens_per_s"]
        comp = {"hf": ["hf", "hf_ckpt"], "liger": ["liger", "liger_ckpt"], "seed": ["seed"],
                "hf_or_liger": ["hf", "hf_ckpt", "liger", "liger_ckpt"]}
        for key, need in BAR.get(cap, {}).items():
            t, who = best(rows, comp[key], cap)
            out[f"cap{cap}_vs_{key}"] = {"fast_tok_s": ft, "best": who, "best_tok_s": t,
                                         "speedup": ft / t if t else None, "bar": need,
                                         "pass": (ft / t >= need) if t else None}
        out[f"cap{cap}_fast_mfu_measured_peak"] = f.get("mfu_measured_peak")
    g = {k: rows.get(k, {}).get("guard") for k in ("hf", "liger", "fast", "fast8")}
    if g["hf"] and g["fast"]:
        for k in ("fast", "liger", "fast8"):
            if not g[k]:
                continue
            rel = [abs(a - b) / abs(b) for a, b in zip(g[k]["losses"], g["hf"]["losses"])]
            out[f"guard_{k}_vs_hf"] = {"steps": len(rel), "max_rel_diff": max(rel), "pass": max(rel) <= 0.01
                                       and all(x > 0 for x in g[k]["grad_norms"]),
                                       "min_grad_norm": min(g[k]["grad_norms"])}
    return out


def fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


def markdown(res: dict) -> str:
    e = res["env"]
    L = [f"# loralab fast recipe vs seed, HF + PEFT, HF + PEFT + Liger ({e['gpu']['name']})", "",
         f"- command: `{res['command']}`",
         f"- date: {res['date']}; GPU: {e['gpu']['name']}, driver {e['gpu'].get('driver')}; "
         + ", ".join(f"{k} {v}" for k, v in e["versions"].items()),
         f"- model: {res['model']} (random weights: speed and memory do not depend on them); data: {res['data']}",
         f"- seq {res['seq_len']} tokens; steps per config: {res['warmup']} warm-up + {res['steps']} timed "
         f"(seed: {res['seed_warmup']} + {res['seed_steps']}); batch: largest that fits, at most {res['max_batch']}",
         f"- MFU = analytic model FLOPs (loralab.flops) / step time / peak; peaks: data sheet "
         f"{fmt(res['peak_tflops_datasheet'], '.0f')} TFLOP/s bf16 dense, measured bf16 matmul "
         f"{fmt(res['peak_tflops_measured'], '.0f')} TFLOP/s", "",
         "| method | cap GiB | batch | tok/s | step s | peak alloc GiB | peak reserved GiB | MFU % (sheet) | MFU % (measured peak) | checkpointing | first losses |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        if not m.get("caps"):
            L.append(f"| {name} | - | - | - | - | - | - | - | - | - | {m.get('status', '')[:120]} |")
            continue
        for cap, c in m["caps"].items():
            if c.get("status") != "ok":
                L.append(f"| {name} | {cap} | does not fit | - | - | - | - | - | - | - | {c.get('note', '')} |")
                continue
            L.append(f"| {name} | {cap} | {c['batch_size']} | {fmt(c['tokens_per_s'])} | {c['step_time_s']:.3f} | "
                     f"{fmt(c['peak_allocated_gib'], '.1f')} | {fmt(c['peak_reserved_gib'], '.1f')} | "
                     f"{fmt(c['mfu'] and 100 * c['mfu'], '.1f')} | {fmt(c.get('mfu_measured_peak') and 100 * c['mfu_measured_peak'], '.1f')} | "
                     f"{c.get('checkpointing')} | {', '.join(f'{x:.3f}' for x in c['losses'][:3])} |")
    L += ["", "## Bar", "", "| check | fast tok/s | best other | its tok/s | speedup | bar | pass |", "|---|---|---|---|---|---|---|"]
    for k, v in res.get("verdicts", {}).items():
        if isinstance(v, dict) and "speedup" in v:
            L.append(f"| {k} | {fmt(v['fast_tok_s'])} | {v['best']} | {fmt(v['best_tok_s'])} | "
                     f"{fmt(v['speedup'], '.2f')}x | {v['bar']}x | {v['pass']} |")
    for k, v in res.get("verdicts", {}).items():
        if k.startswith("guard"):
            L.append(f"\n- correctness guard {k}: {v['steps']} steps at batch 1, max per-step loss difference "
                     f"{100 * v['max_rel_diff']:.3f} % (bar 1 %), min grad norm {v['min_grad_norm']:.3g}: "
                     f"{'pass' if v['pass'] else 'FAIL'}")
        elif "mfu_measured" in k and v is not None:
            L.append(f"\n- {k}: {100 * v:.1f} % (aim 75 %)")
    for name, m in res["methods"].items():
        for cap, c in (m.get("caps") or {}).items():
            if c.get("mfu_measured_fp8_peak") is not None:
                L.append(f"\n- {name} cap {cap}: MFU {100 * c['mfu_measured_fp8_peak']:.1f} % of the measured FP8 matmul peak "
                         f"({fmt(res.get('peak_tflops_measured_fp8'), '.0f')} TFLOP/s; its frozen GEMMs run in FP8, attention "
                         f"and LoRA in bf16), {100 * (c.get('mfu_measured_peak') or 0):.1f} % of the bf16 one")
    levers = {n: m.get("levers") for n, m in res["methods"].items() if m.get("levers")}
    if levers:
        L += ["", "## Levers per method", ""]
        for n, lv in levers.items():
            L.append(f"- **{n}**: " + "; ".join(f"{k} = {v}" for k, v in lv.items()))
    errs = [(n, e) for n, m in res["methods"].items() for e in m.get("errors", [])]
    if errs:
        L += ["", "## Errors and fallbacks", ""] + [f"- {n}: {e}" for n, e in errs]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seq 64, few steps")
    ap.add_argument("--ablation", action="store_true", help="the fast recipe with one lever changed at a time (cap 40)")
    ap.add_argument("--only", default="", help="comma-separated methods (" + ", ".join(method_recipes()) + ")")
    ap.add_argument("--caps", type=float, nargs="*", default=None, help="GiB caps (default 40 24; ablation 40)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed-warmup", type=int, default=1)
    ap.add_argument("--seed-steps", type=int, default=2)
    ap.add_argument("--guard-steps", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--model-folder", default="", help="HF folder to load (e.g. materialize_preset('llama2-7b')); default: random weights built on the GPU")
    ap.add_argument("--data", default="", help="SAMSum folder (default $LORALAB_SAMSUM_DIR)")
    ap.add_argument("--tokenizer", default="", help="Llama 2 tokenizer.model (default $LORALAB_LLAMA2_TOKENIZER)")
    ap.add_argument("--budget-s", type=float, default=470, help="stop starting new methods after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=240, help="per method")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    t_start = time.perf_counter()
    recipes = method_recipes()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or (ABLATION if args.ablation else MAIN)
    bad = [n for n in names if n not in recipes]
    if bad:
        raise ConfigError(f"--only {','.join(bad)}: expected names from {', '.join(recipes)}")
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.seq_len, args.warmup, args.steps = min(args.seq_len, 64), 1, 2
        args.seed_warmup, args.seed_steps, args.guard_steps, args.max_batch = 1, 1, min(args.guard_steps, 5), min(args.max_batch, 2)
        args.timeout_s = max(args.timeout_s, 300)
        args.budget_s = max(args.budget_s, 1800)
    caps = args.caps if args.caps is not None else ([40.0] if args.ablation else [40.0, 24.0])
    if args.ablation:
        args.guard_steps = 0  # the guard belongs to the main comparison
    if not cuda:
        caps = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info() if cuda else {"name": f"cpu ({platform.machine()})", "driver": None}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "smoke" if args.smoke else ("ablation" if args.ablation else "compare")
    gname = gpu["name"].replace("NVIDIA ", "").replace(" ", "-").split("(")[0].strip("-")
    base = out / f"{tag}_{gname}_{stamp}"
    n_chunks = max(64, args.guard_steps + 1, (args.warmup + args.steps) * args.max_batch)
    chunks, data_desc = load_chunks(args, args.seq_len, n_chunks)
    tmp = Path(tempfile.mkdtemp(prefix="loralab-compare-"))  # derived data stays outside the repo
    torch.save(chunks, tmp / "chunks.pt")
    peak_sheet = F.device_peak_tflops(gpu["name"]) if cuda else None
    peak_meas = None
    if cuda:
        from loralab.profilers import measure_matmul_peak
        peak_meas = measure_matmul_peak("cuda")
        torch.cuda.empty_cache()
        log(f"measured bf16 matmul peak: {peak_meas:.0f} TFLOP/s (data sheet {peak_sheet} TFLOP/s)")
    peak_fp8 = None
    if cuda and any(getattr(recipes[n], "fp8", "off") != "off" for n in names):
        try:
            peak_fp8 = measure_matmul_peak("cuda", torch.float8_e4m3fn)
            log(f"measured FP8 (e4m3, rowwise scales) matmul peak: {peak_fp8:.0f} TFLOP/s")
        except RuntimeError as e:  # no FP8 tensor cores: the fp8 methods report it themselves
            log(f"FP8 matmul peak not measured: {' '.join(str(e).split())[:200]}")
        torch.cuda.empty_cache()
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "env": {"gpu": gpu, "versions": versions(), "host": platform.node()},
           "model": "tiny preset" if args.smoke else (args.model_folder or "Llama-2-7B shape (llama2-7b preset config)"),
           "random_weights": True, "data": data_desc, "seq_len": args.seq_len, "caps_gib": caps,
           "warmup": args.warmup, "steps": args.steps, "seed_warmup": args.seed_warmup, "seed_steps": args.seed_steps,
           "guard_steps": args.guard_steps, "max_batch": args.max_batch,
           "peak_tflops_datasheet": peak_sheet, "peak_tflops_measured": peak_meas,
           "peak_tflops_measured_fp8": peak_fp8, "methods": {}}

    def write():
        res["verdicts"] = verdicts(res)
        res["elapsed_s"] = time.perf_counter() - t_start
        base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
        base.with_suffix(".md").write_text(markdown(res))

    for name in names:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            res["methods"][name] = {"status": f"skipped: time budget ({args.budget_s:.0f} s) spent"}
            log(f"{name}: skipped, budget spent")
            write()
            continue
        rec = recipes[name]
        slow = name == "seed"
        spec = {"method": name, "recipe": {**asdict(rec), "lora_targets": list(rec.lora_targets)},
                "device": "cuda" if cuda else "cpu", "preset": "tiny" if args.smoke else "llama2-7b",
                "model_folder": args.model_folder, "chunks": str(tmp / "chunks.pt"), "caps": caps,
                "warmup": args.seed_warmup if slow else args.warmup, "steps": args.seed_steps if slow else args.steps,
                "guard_steps": args.guard_steps, "max_batch": args.max_batch, "seed": args.seed,
                "peak_sheet": peak_sheet, "peak_measured": peak_meas, "peak_measured_fp8": peak_fp8,
                "result": str(tmp / f"{name}.json")}
        (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
        log(f"=== {name} ({rec.name}) ===")
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, __file__, "--worker", str(tmp / f"{name}.spec.json")],
                                timeout=min(args.timeout_s, left)).returncode
            status = None if rc == 0 else f"worker exit code {rc}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {min(args.timeout_s, left):.0f} s (partial results kept)"
        r = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
        r.pop("_probes", None)
        if status:
            r["status"] = r.get("status", "") + f" [{status}]" if r.get("status", "").startswith("error") else status
        r["process_s"] = time.perf_counter() - t0
        res["methods"][name] = r
        write()
    write()
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {base}.json, {base}.md")
    print(base.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
