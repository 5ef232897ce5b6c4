"""The fast recipe side by side with today's libraries: one command, one GPU, same data, same steps.

    . benchmarks/gpu_env.sh && python benchmarks/compare.py                 # H200: ~7 min
    python benchmarks/compare.py --only hf,liger,fast --caps 40              # H200: ~4 min
    python benchmarks/compare.py --ablation                                  # H200: the levers, ~7 min
    python benchmarks/compare.py --smoke --only hf,fast --out /tmp/cmp       # CPU, tiny model, ~1 min

Llama-2-7B shape, random weights built on the GPU (speed and memory do not depend on the
values), 2048-token packed SAMSum chunks (``LORALAB_SAMSUM_DIR`` + ``LORALAB_LLAMA2_TOKENIZER``;
without them: random token ids, said so in the output). Methods (``--only`` takes the short name
or the recipe's name in ``loralab.config.RECIPES``), each in its own process (memory, compile
caches and Liger's patches stay isolated):

  seed        seed                the study's recipe: int8 base (bitsandbytes), fp32 rest, eager attention, checkpointing
  hf          hf-peft             plain HF + PEFT LoRA in bf16, SDPA, as a user writes it (dropout 0.05, peft's fp32 adapters)
  hf_ckpt     hf-peft-ckpt        the same with HF gradient checkpointing
  liger       hf-peft-liger       hf + Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy): Axolotl/TRL's switch
  liger_ckpt  hf-peft-liger-ckpt  the same with checkpointing
  fast        fast                loralab's ``fast`` recipe (loralab.fast)
  --ablation: fast and the fast-* variants of the registry (one lever changed each)

What a method runs is the library's, as training runs it: the model (``model.build_random_model``,
or ``load_base_model`` + ``add_lora`` for ``--model-folder``), the step (``train.training_step`` on
``distributed.wrap_model``: the recipe's own loss, e.g. fast's chunked cross-entropy), the optimizer
(``train.optimizer_setup``), the memory cap, peaks and out-of-memory handling (``loralab.device``),
the batch search (``autobatch.find_batch_size``) and MFU (``flops.sweep_metrics``).

Per method and memory cap (``device.cap_gpu_memory``: 40 and 24 GiB): the largest batch that fits,
at most ``--max-batch``: ``find_batch_size`` starts at the largest batch its predictor says fits and
confirms it with the timed run itself, stepping down on out-of-memory. ``--predictor probes``
(default, what the committed results used): one step at batch 1 and one at 2 (at the first cap),
``autobatch.linear_predictor`` on their allocated peaks plus a headroom of max(0.75 GiB, 4 % of the
cap); ``--predictor model``: ``memory.predict_peak`` where it models the recipe (not Liger), else the
probes. Then warm-up + timed steps from the same LoRA init: tokens/s, peak memory, MFU (analytic
model FLOPs, ``loralab.flops``) against the data-sheet bf16 peak and against the matmul peak measured
here, the losses of those steps. A correctness guard runs the first ``--guard-steps`` steps at batch
1 on the same chunks for hf, liger and fast, LoRA dropout 0 for all (hf and liger: their recipe with
``lora_dropout=0`` in a model of its own, the timed model keeps the recipe's dropout): per-step losses
must agree within 1 %, gradient norms be non-zero. JSON and a markdown table go to ``--out`` after
every method, so a timeout still leaves data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from loralab import distributed as D
from loralab import fast as FAST
from loralab import flops as F
from loralab.autobatch import find_batch_size, linear_predictor
from loralab.config import RECIPES, ConfigError, RunConfig, get_recipe
from loralab.device import (GIB, MemoryMeter, cap_gpu_memory, capacity_gib, free_memory, gpu_info, is_oom, sync,
                            versions)
from loralab.memory import predict_peak
from loralab.model import add_lora, build_random_model, load_base_model
from loralab.shape import model_config
from loralab.train import optimizer_setup, training_step

METHODS = {"hf": "hf-peft", "fast": "fast", "fast8": "fast8", "liger": "hf-peft-liger", "hf_ckpt": "hf-peft-ckpt",
           "liger_ckpt": "hf-peft-liger-ckpt", "seed": "seed"}
"""Short name (the JSON's and the tables' key) -> recipe name in loralab.config.RECIPES; in run order."""
MAIN = list(METHODS)
ABLATION = ["fast", "fast-eager-layers", "fast-liger-no-compile", "fast-compile+liger", "fast-hf-ce",
            "fast-lora-fp32-input", "fast-dropout", "fast-selective-ckpt", "fast-full-ckpt", "fast-offload",
            "fast-doc-positions", "fast-caching-allocator"]
FP8_ABLATION = ["fast8", "fast8-tensorwise", "fast8-unfused-shared", "fast8-unfused-per-gemm", "fast8-per-step-wt",
                "fast8-lm-head"]
BAR = {"fast": {"40": {"hf": 1.5, "liger": 1.1, "seed": 12.0}, "24": {"hf_or_liger": 1.2}},
       "fast8": {"40": {"fast": 1.35, "hf": 2.0, "liger": 1.55}, "24": {"hf_or_liger": 1.7, "fast": 1.0}}}
"""method -> cap -> the methods it must beat and by how much (fast8: also 27,000 tok/s at 40 GiB, FP8_TOKENS_PER_S)."""
FP8_TOKENS_PER_S = 27_000
GUARD = {"hf", "liger", "fast", "fast8"}
VERSIONS = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def method_names(only: str, ablation: bool) -> list[str]:
    """``--only``: short names (hf, liger, ...) or recipe names; a main method's recipe name maps to its short name."""
    short = {r: m for m, r in METHODS.items()}
    names = [short.get(n.strip(), n.strip()) for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS and n not in RECIPES]
    if bad:
        raise ConfigError(f"--only {','.join(bad)}: expected short names ({', '.join(METHODS)}) or recipe names "
                          f"({', '.join(RECIPES)})")
    return names or ((FP8_ABLATION if ablation == "fp8" else ABLATION) if ablation else MAIN)


def guard_recipe(recipe):
    """The guard compares the math: the method's recipe with LoRA dropout off (a guard-only knob)."""
    return recipe if recipe.lora_dropout == 0 else recipe.replace(lora_dropout=0.0)


# =================================================================== worker (one method, one process)

class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.cfg = RunConfig.from_dict(spec["config"])
        self.recipe = self.cfg.recipe
        self.ctx = D.single_process_context(self.cfg)
        self.dev = self.ctx.device
        self.meter = MemoryMeter(self.dev)
        self.mcfg = model_config(self.cfg.model)
        self.chunks = torch.load(spec["chunks"])
        self.seq = self.chunks.shape[1]
        self.out = Path(spec["result"])
        self.model = None
        self.res: dict = {"method": spec["method"], "recipe": spec["config"]["recipe"], "caps": {}, "errors": [],
                          "notes": []}

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, self.out)

    # ---------------------------------------------------------- model and state
    def build(self, recipe) -> None:
        """The LoRA model as training builds it, inside the module the step calls (``distributed.wrap_model``)."""
        self.model = self.params = self.init_state = None
        free_memory(self.dev)
        t0 = time.perf_counter()
        if self.cfg.random_weights:
            peft_model = build_random_model(self.mcfg, recipe, self.dev, seed=self.cfg.seed)
        else:
            base = load_base_model(Path(self.cfg.model), recipe, self.dev)
            torch.manual_seed(self.cfg.seed)
            peft_model = add_lora(base, recipe)
        sync(self.dev)
        self.res["build_s"] = time.perf_counter() - t0
        self.res["levers"] = dict(getattr(peft_model, "loralab_levers", {}))
        self.model = D.wrap_model(peft_model, self.ctx, recipe)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init_state = [p.detach().clone() for p in self.params]
        log(f"{self.spec['method']}: built {recipe.name} in {self.res['build_s']:.1f} s; levers {self.res['levers']}")

    def restart(self):
        """Back to the LoRA init, with a fresh optimizer (``train.optimizer_setup``): every measurement starts alike."""
        with torch.no_grad():
            for p, s in zip(self.params, self.init_state):
                p.copy_(s)
                p.grad = None
        return optimizer_setup(self.model, self.cfg)[0]

    def batch(self, start: int, bs: int) -> dict:
        idx = [(start + i) % self.chunks.shape[0] for i in range(bs)]
        ids = self.chunks[idx].to(self.dev)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    # ---------------------------------------------------------- guard
    def guard(self) -> None:
        n = self.spec["guard_steps"]
        opt = self.restart()
        norms = []
        opt.register_step_pre_hook(lambda *_: norms.append(torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in self.params if p.grad is not None]))))
        t0 = time.perf_counter()
        losses = [training_step(self.model, [self.batch(i, 1)], opt, self.ctx)[0] for i in range(n)]
        sync(self.dev)
        self.res["guard"] = {"steps": n, "batch_size": 1, "losses": losses, "grad_norms": [float(x) for x in norms],
                             "seconds": time.perf_counter() - t0, "lora_dropout": 0.0,
                             "recipe_lora_dropout": self.recipe.lora_dropout}
        log(f"guard: {n} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    # ---------------------------------------------------------- measurement
    def timed(self, bs: int, warmup: int, steps: int) -> dict:
        """warm-up + timed training steps at batch ``bs`` from the LoRA init. Out of memory: the memory is given
        back and ``torch.OutOfMemoryError`` raised (what ``autobatch.find_batch_size`` steps down on)."""
        opt = self.restart()
        self.meter.reset()
        times, losses, oom, b = [], [], None, None
        try:
            for i in range(warmup + steps):
                b = self.batch(i * bs, bs)
                sync(self.dev)
                t0 = time.perf_counter()
                losses.append(training_step(self.model, [b], opt, self.ctx)[0])
                sync(self.dev)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is a result
            if not is_oom(e):
                raise
            oom = f"batch {bs}: out of memory at step {len(times) + 1}"
        if oom:  # outside the except block: its traceback no longer holds the step's tensors
            opt.zero_grad(set_to_none=True)
            del opt, b
            free_memory(self.dev)
            raise torch.OutOfMemoryError(oom)
        steady = times[warmup:]
        st = sum(steady) / len(steady)
        peaks = self.meter.read()
        return {"oom": False, "batch_size": bs, "tokens_per_step": bs * self.seq, "step_time_s": st,
                "tokens_per_s": bs * self.seq / st, "step_times_s": times, "first_step_s": times[0],
                "losses": losses, **peaks}

    def probe(self, bs: int) -> dict:
        """One step at batch ``bs`` from the init: its peaks, or {'oom': True}."""
        try:
            r = self.timed(bs, 0, 1)
        except torch.OutOfMemoryError:
            return {"batch_size": bs, "oom": True}
        return {"batch_size": bs, "oom": False, "seconds": r["step_time_s"],
                **{k: r[k] for k in MemoryMeter.KEYS}}

    def predictor(self, cap: float | None, res: dict):
        """Peak GiB at batch b under this cap, for ``find_batch_size`` (``--predictor``)."""
        if self.spec["predictor"] == "model":
            try:
                predict_peak(self.mcfg, self.recipe, 1, self.seq, device=self.dev.type)
                res["predictor"] = "memory.predict_peak"
                return lambda b: predict_peak(self.mcfg, self.recipe, b, self.seq, device=self.dev.type).need(
                    cap is not None) / GIB
            except ConfigError as e:  # Liger: not modelled
                res["predictor_note"] = str(e)
        res["predictor"] = "probes at batch 1 and 2 (autobatch.linear_predictor) + headroom"
        probes = self.res.setdefault("_probes", {})  # measured once, at the first cap
        for b in range(1, min(2, self.spec["max_batch"]) + 1):
            if str(b) not in probes:
                probes[str(b)] = self.probe(b)
                res["probes"].append(probes[str(b)])
        p1, p2 = probes["1"], probes.get("2")
        if p1["oom"]:
            return lambda b: math.inf  # the timed run at batch 1 says whether anything fits
        if p1["peak_allocated_gib"] is None:  # CPU: no allocator to read, no cap: the largest allowed
            return lambda b: 0.0
        headroom = max(0.75, 0.04 * cap) if cap else 0.0
        if p2 is None or p2["oom"]:
            return lambda b: p1["peak_allocated_gib"] + headroom if b == 1 else math.inf
        lin = linear_predictor(p1["peak_allocated_gib"], p2["peak_allocated_gib"])
        res["slope_gib_per_row"] = lin(2) - lin(1)
        return lambda b: lin(b) + headroom

    def model_prediction(self, bs: int) -> float | None:
        """The memory model's peak reserved GiB, recorded beside the measurement (None where it does not model the recipe)."""
        try:
            return predict_peak(self.mcfg, self.recipe, bs, self.seq, device=self.dev.type).reserved / GIB
        except ConfigError:
            return None

    def mfu(self, r: dict) -> None:
        rec = self.recipe
        if rec.gradient_checkpointing != "full" or rec.checkpoint_layers is not None:
            rec = rec.replace(gradient_checkpointing="none")  # non-reentrant: no input grads, recompute not model FLOPs
        m = F.sweep_metrics(self.mcfg, rec, r["batch_size"], self.seq, r["step_time_s"], self.spec.get("peak_sheet"))
        r.update(flops_per_step=m["flops_per_step"], tflops_per_s=m["tflops_per_s"], mfu=m["mfu"],
                 peak_tflops_datasheet=self.spec.get("peak_sheet"), peak_tflops_measured=self.spec.get("peak_measured"))
        pm, p8 = self.spec.get("peak_measured"), self.spec.get("peak_measured_fp8")
        r["mfu_measured_peak"] = m["tflops_per_s"] / pm if pm else None
        # an FP8 base runs its frozen GEMMs at the FP8 rate (attention and LoRA stay bf16): both ceilings
        r["mfu_measured_fp8_peak"] = m["tflops_per_s"] / p8 if p8 and self.recipe.fp8 != "off" else None

    def run_cap(self, cap: float | None) -> dict:
        free_memory(self.dev)
        cap_gpu_memory(cap, self.dev)
        sp = self.spec
        res: dict = {"cap_gib": cap, "probes": [], "checkpointing": "as recipe"}
        predict = self.predictor(cap, res)
        capacity = cap or (capacity_gib(None, self.dev)[0] if self.dev.type == "cuda" else math.inf)
        runs: dict[int, dict] = {}

        def timed_run(b: int) -> float | None:
            try:
                runs[b] = self.timed(b, sp["warmup"], sp["steps"])
            except torch.OutOfMemoryError:
                res["probes"].append({"batch_size": b, "oom": True, "during": "timed run"})
                log(f"  batch {b}: out of memory, stepping down")
                raise
            return runs[b]["peak_reserved_gib"]

        found = find_batch_size(predict, timed_run, capacity, max_batch=sp["max_batch"])
        if not found.chosen:
            res.update(status="oom", batch_size=0, note="batch 1 does not fit")
            return res
        res.update(status="ok", **runs[found.chosen])
        res["predicted_peak_reserved_gib"] = self.model_prediction(found.chosen)
        self.mfu(res)
        return res

    def run(self) -> None:
        caps = self.spec["caps"] or [None]
        cap_gpu_memory(caps[0], self.dev)
        # The recipe's compile options, unchanged (loralab.fast.compile_options): the program training runs.
        # Training sees one batch size per process, so on packed rows its layers compile one static graph;
        # this process tries several batch sizes, and torch's automatic dynamic shapes would turn the batch
        # dimension symbolic after the first change. Off here, each batch size gets training's static graph
        # (cached, so a batch size seen before is not compiled again).
        torch._dynamo.config.automatic_dynamic_shapes = False
        self.res["compile"] = {"options": FAST.compile_options(self.recipe), "automatic_dynamic_shapes": False,
                               "graphs": "one static graph per batch size, as training compiles"}
        guard = self.spec["method"] in GUARD and self.spec["guard_steps"]
        try:
            self.build(guard_recipe(self.recipe) if guard else self.recipe)
            self.save()
            if guard:
                self.guard()
                self.save()
                if guard_recipe(self.recipe) != self.recipe:  # the timed model keeps the recipe's dropout
                    self.build(self.recipe)
        except ConfigError as e:
            self.res["status"] = f"unavailable: {e}"
            log(f"{self.spec['method']}: {e}")
            self.save()
            return
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
    comp = {"hf": ["hf", "hf_ckpt"], "liger": ["liger", "liger_ckpt"], "seed": ["seed"], "fast": ["fast"],
            "hf_or_liger": ["hf", "hf_ckpt", "liger", "liger_ckpt"]}
    for method, bars in BAR.items():
        for cap, needs in bars.items():
            f = rows.get(method, {}).get("caps", {}).get(cap, {})
            if f.get("status") != "ok":
                continue
            ft = f["tokens_per_s"]
            prefix = f"cap{cap}" if method == "fast" else f"{method}_cap{cap}"
            for key, need in needs.items():
                t, who = best(rows, comp[key], cap)
                out[f"{prefix}_vs_{key}"] = {"method": method, "fast_tok_s": ft, "best": who, "best_tok_s": t,
                                             "speedup": ft / t if t else None, "bar": need,
                                             "pass": (ft / t >= need) if t else None}
            out[f"{prefix}_{method}_mfu_measured_peak"] = f.get("mfu_measured_peak")
            if method == "fast8":
                out[f"{prefix}_fast8_mfu_measured_fp8_peak"] = f.get("mfu_measured_fp8_peak")
                if cap == "40":
                    out["fast8_cap40_tokens_per_s"] = {"method": method, "fast_tok_s": ft, "best": "(absolute)",
                                                       "best_tok_s": FP8_TOKENS_PER_S, "speedup": ft / FP8_TOKENS_PER_S,
                                                       "bar": 1.0, "pass": ft >= FP8_TOKENS_PER_S}
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
         f"(seed: {res['seed_warmup']} + {res['seed_steps']}); batch: largest that fits, at most {res['max_batch']} "
         f"(autobatch.find_batch_size, predictor: {res.get('predictor', 'probes')})",
         "- compile: each recipe's own options (loralab.fast.compile_options, as training), one static graph per batch "
         "size (automatic dynamic shapes off in this process; a training process never changes shape on packed rows)",
         f"- MFU = analytic model FLOPs (loralab.flops) / step time / peak; peaks: data sheet "
         f"{fmt(res['peak_tflops_datasheet'], '.0f')} TFLOP/s bf16 dense, measured bf16 matmul "
         f"{fmt(res['peak_tflops_measured'], '.0f')} TFLOP/s"
         + (f", measured FP8 (e4m3, rowwise) matmul {fmt(res['peak_tflops_measured_fp8'], '.0f')} TFLOP/s (the FP8 "
            f"recipes' MFU is given against both)" if res.get("peak_tflops_measured_fp8") else ""), "",
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
    L += ["", "## Bar", "", "| check | method | tok/s | best other | its tok/s | speedup | bar | pass |",
          "|---|---|---|---|---|---|---|---|"]
    for k, v in res.get("verdicts", {}).items():
        if isinstance(v, dict) and "speedup" in v:
            L.append(f"| {k} | {v.get('method', 'fast')} | {fmt(v['fast_tok_s'])} | {v['best']} | {fmt(v['best_tok_s'])} | "
                     f"{fmt(v['speedup'], '.2f')}x | {v['bar']}x | {v['pass']} |")
    for k, v in res.get("verdicts", {}).items():
        if k.startswith("guard"):
            L.append(f"\n- correctness guard {k}: {v['steps']} steps at batch 1, max per-step loss difference "
                     f"{100 * v['max_rel_diff']:.3f} % (bar 1 %), min grad norm {v['min_grad_norm']:.3g}: "
                     f"{'pass' if v['pass'] else 'FAIL'}")
        elif "mfu_measured" in k and v is not None:
            L.append(f"\n- {k}: {100 * v:.1f} %")
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
    ap.add_argument("--ablation", nargs="?", const="fast", default="", choices=["fast", "fp8"],
                    help="the fast recipe (or, with 'fp8', fast8) with one lever changed at a time (cap 40)")
    ap.add_argument("--only", default="", help="comma-separated methods: short names (" + ", ".join(METHODS)
                    + ") or recipe names (loralab.config.RECIPES, e.g. the fast-* ablation variants)")
    ap.add_argument("--caps", type=float, nargs="*", default=None, help="GiB caps (default 40 24; ablation 40)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed-warmup", type=int, default=1)
    ap.add_argument("--seed-steps", type=int, default=2)
    ap.add_argument("--guard-steps", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--predictor", choices=["probes", "model"], default="probes",
                    help="where the batch search starts: probe steps at batch 1 and 2 (the committed results), or "
                         "loralab.memory.predict_peak where it models the recipe")
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
    names = method_names(args.only, args.ablation)
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
    gpu = gpu_info()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "smoke" if args.smoke else ({"fast": "ablation", "fp8": "ablation-fp8"}.get(args.ablation) or "compare")
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
    if cuda and any(get_recipe(METHODS.get(n, n)).fp8 != "off" for n in names):
        try:
            peak_fp8 = measure_matmul_peak("cuda", torch.float8_e4m3fn)
            log(f"measured FP8 (e4m3, rowwise scales) matmul peak: {peak_fp8:.0f} TFLOP/s")
        except RuntimeError as e:  # no FP8 tensor cores: the fp8 methods say so themselves
            log(f"FP8 matmul peak not measured: {' '.join(str(e).split())[:200]}")
        torch.cuda.empty_cache()
    model = "tiny" if args.smoke else (args.model_folder or "llama2-7b")
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "env": {"gpu": gpu, "versions": versions(VERSIONS), "host": platform.node()},
           "model": "tiny preset" if args.smoke else (args.model_folder or "Llama-2-7B shape (llama2-7b preset config)"),
           "random_weights": RunConfig(model=model).random_weights, "data": data_desc, "seq_len": args.seq_len,
           "caps_gib": caps, "warmup": args.warmup, "steps": args.steps, "seed_warmup": args.seed_warmup,
           "seed_steps": args.seed_steps, "guard_steps": args.guard_steps, "max_batch": args.max_batch,
           "predictor": args.predictor,
           "peak_tflops_datasheet": peak_sheet, "peak_tflops_measured": peak_meas, "peak_tflops_measured_fp8": peak_fp8,
           "methods": {}}

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
        rec = get_recipe(METHODS.get(name, name))
        slow = name == "seed"
        cfg = RunConfig(model=model, recipe=rec, seq_len=args.seq_len, device="cuda" if cuda else "cpu", seed=args.seed)
        spec = {"method": name, "config": cfg.to_dict(), "chunks": str(tmp / "chunks.pt"), "caps": caps,
                "warmup": args.seed_warmup if slow else args.warmup, "steps": args.seed_steps if slow else args.steps,
                "guard_steps": args.guard_steps, "max_batch": args.max_batch, "predictor": args.predictor,
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
