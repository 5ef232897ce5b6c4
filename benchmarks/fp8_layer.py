"""One Llama-2-7B decoder layer with a frozen FP8 base (loralab.fp8) against bf16 (fast): time, memory, error.

    . benchmarks/gpu_env.sh && python benchmarks/fp8_layer.py --out benchmarks/results/   # H200: ~4 min, one invocation
    python benchmarks/fp8_layer.py --smoke --out /tmp/fp8-smoke    # CPU, tiny shapes, the same code path (~1 min)

The layer as ``fast`` trains it: hidden 4096, intermediate 11008, 32 heads, SDPA, bf16 weights, LoRA r8 on
q/v (no dropout, bf16 matmuls, fp32 master weights; B non-zero so every LoRA gradient is exercised), compiled
by ``loralab.fast.configure_layers`` with the recipe's compile options (``loralab.fast.compile_options``), one
static graph per batch size, as training and benchmarks/compare.py compile it. Per
batch (2048-token rows) and variant: forward + backward of the layer (input gradient + LoRA gradients; no
gradient for the frozen weights), median milliseconds over ``--iters`` (CUDA events, after ``--warmup``
untimed steps; the compiling first call is timed apart), the CPU time to issue the same work (close to the GPU
time = the layer is launch-bound), the peak memory of the step over what was allocated before it, and the relative error
(Frobenius) of the output, the input gradient and the LoRA gradients against the bf16 layer and against an
fp32 copy of it (eager).

Variants: ``bf16`` (fast), ``fp8`` (fast8's settings) and fp8 with one switch changed at a time (scaling,
W^T kept or per step, fused q/k/v + gate/up or not, shared or per-GEMM quantisation, fast accumulation); the
ablations run at the largest batch only (``EVERY_BATCH``; ``--all-batches`` for all). ``--smoke`` compiles with
dynamo + AOTAutograd only (``backend="aot_eager"``: Inductor takes minutes per layer on a CPU).
Also: the LM head + chunked cross-entropy (loralab.fast) with a bf16 vs an FP8 head, the bf16 and FP8 matmul
peaks (loralab.profilers.measure_matmul_peak) and the "GEMM floor": the frozen linears' GEMMs alone at the
layer's shapes (fused and unfused), bf16 vs FP8, so layer time minus floor = what the rest costs.
A variant that fails is recorded (error and traceback tail) and the run goes on. JSON and markdown go to
``--out`` after every variant, so a timeout still leaves data.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from loralab import fast, fp8
from loralab import flops as F
from loralab.config import get_recipe
from loralab.shape import ModelShape, preset_config
from loralab.model import build_random_model
from loralab.profilers import measure_matmul_peak

BEST = fp8.FP8Settings.of(get_recipe("fast8"))
VARIANTS: dict[str, fp8.FP8Settings | None] = {
    "bf16": None,
    "fp8": BEST,
    "fp8 unfused, per-GEMM quant": BEST.replace(fused=False, shared_quant=False),
    "fp8 W^T per step": BEST.replace(weight_t="per-step"),
    "fp8 tensorwise": BEST.replace(scaling="tensorwise"),
    "fp8 unfused, shared quant": BEST.replace(fused=False, shared_quant=True),
    "fp8 fast accum bwd too": BEST.replace(fast_accum_bwd=True),
    "fp8 no fast accum": BEST.replace(fast_accum_fwd=False),
}
"""Ordered by what the decision needs first (a run out of budget drops the last ones)."""
EVERY_BATCH = ("bf16", "fp8", "fp8 unfused, per-GEMM quant")
"""Run at every batch size; the other ablations at the largest only (each batch size is one more compile),
unless --all-batches."""
HEADS = {"bf16": None, "fp8 (W^T kept)": BEST.replace(lm_head=True),
         "fp8 (W^T per step)": BEST.replace(lm_head=True, weight_t="per-step")}


LOG: list[Path] = []
"""The progress log in --out (set by main): every line also goes there (tee)."""


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    for p in LOG:
        with p.open("a") as f:
            f.write(line + "\n")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rel(a: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    if a is None or ref is None:
        return None
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


class Timer:
    """Median ms of a callable over iters (CUDA events; perf_counter on CPU) and the CPU time to issue it."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def run(self, fn, iters: int, warmup: int, before=None) -> dict:
        for _ in range(warmup):
            if before:
                before()
            fn()
        sync(self.dev)
        gpu, cpu = [], []
        for _ in range(iters):
            if before:
                before()
            if self.dev.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
            t0 = time.perf_counter()
            fn()
            cpu.append(1000 * (time.perf_counter() - t0))
            if self.dev.type == "cuda":
                e.record()
                gpu.append((s, e))
        sync(self.dev)
        ms = [s.elapsed_time(e) for s, e in gpu] if gpu else cpu
        return {"ms": statistics.median(ms), "ms_min": min(ms), "cpu_issue_ms": statistics.median(cpu)}


# =================================================================== GEMM floor

def gemm_shapes(cfg, tokens: int, fused: bool) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K) of every frozen-linear GEMM of one layer's forward + backward (input gradients only)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    Hq, Hkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    if fused:
        fwd = [("qkv", Hq + 2 * Hkv, H), ("o", H, Hq), ("gate_up", 2 * I, H), ("down", H, I)]
    else:
        fwd = [("q", Hq, H), ("k", Hkv, H), ("v", Hkv, H), ("o", H, Hq), ("gate", I, H), ("up", I, H), ("down", H, I)]
    return [(f"{n} fwd", tokens, o, i) for n, o, i in fwd] + [(f"{n} dx", tokens, i, o) for n, o, i in fwd]


def gemm_ms(m: int, n: int, k: int, dev, fp8_on: bool, timer: Timer, iters: int, reps: int = 10) -> float:
    """ms of one (m x k) @ (k x n): bf16, or e4m3 with rowwise scales (forward-GEMM settings); ``reps`` back to
    back per timing so a ~50 us GEMM is not timed with its launch."""
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    if fp8_on:
        aq, sa = fp8.quantize(a)
        bq, sb = fp8.quantize(b)
        sb = sb.reshape(1, n).contiguous()

        def fn():
            for _ in range(reps):
                fp8.scaled_mm(aq, bq.t(), sa, sb, BEST.fast_accum_fwd)
    else:
        def fn():
            for _ in range(reps):
                a @ b.t()  # cuBLAS picks its layout either way
    return timer.run(fn, iters, 2)["ms"] / reps


def gemm_floor(cfg, batches, seq, dev, timer, iters, reps) -> list[dict]:
    rows = []
    for b in batches:
        T = b * seq
        cache: dict = {}
        for fused in (True, False):
            for name, m, n, k in gemm_shapes(cfg, T, fused):
                for kind in ("bf16", "fp8"):
                    key = (m, n, k, kind)
                    if key not in cache:
                        cache[key] = gemm_ms(m, n, k, dev, kind == "fp8", timer, iters, reps)
                    ms = cache[key]
                    rows.append({"batch": b, "fused": fused, "gemm": name, "M": m, "N": n, "K": k, "kind": kind,
                                 "ms": ms, "tflops": 2 * m * n * k / (ms / 1000) / 1e12})
    return rows


def floor_summary(rows: list[dict]) -> list[dict]:
    out = []
    for b in sorted({r["batch"] for r in rows}):
        for fused in (True, False):
            sel = [r for r in rows if r["batch"] == b and r["fused"] == fused]
            bf = sum(r["ms"] for r in sel if r["kind"] == "bf16")
            f8 = sum(r["ms"] for r in sel if r["kind"] == "fp8")
            out.append({"batch": b, "fused": fused, "bf16_ms": bf, "fp8_ms": f8, "speedup": bf / f8 if f8 else None})
    return out


# =================================================================== the layer

def layer_flops(cfg, b: int, seq: int) -> int:
    """Model FLOPs of one decoder layer's forward + backward as benchmarked (loralab.flops: the input requires
    grad, fused attention, full s x s convention; FP8 changes no FLOP): the one-layer step minus its LM head."""
    rec = get_recipe("fast")
    st = F.lora_step_flops(ModelShape.of(cfg), batch_size=b, seq_len=seq, lora_r=rec.lora_r,
                           lora_targets=rec.lora_targets, gradient_checkpointing=False, input_requires_grad=True,
                           attention_kernel="fused")
    return st.model_flops - st.head_fwd - st.head_bwd


class LayerBench:
    def __init__(self, cfg, dev, seq, args):
        self.cfg, self.dev, self.seq, self.args = cfg, dev, seq, args
        self.timer = Timer(dev)
        # compiled below, per variant, after the FP8 swap; Liger off: with compile "off" fast's liger="auto" would
        # patch Liger's RMSNorm/SwiGLU in, which dynamo cannot trace (every compiled variant then fell back to eager)
        rec = get_recipe("fast").replace(compile="off", liger="off")
        self.model = build_random_model(cfg, rec, torch.device(dev) if isinstance(dev, str) else dev, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA B starts at 0 (A would get no gradient): give it values
            for n, p in self.model.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device))
        self.refs: dict = {}

    def inputs(self, b: int, dtype=torch.bfloat16):
        """The same bf16 values for every variant (the fp32 reference gets them upcast, not re-drawn)."""
        g = torch.Generator().manual_seed(100 + b)
        x = torch.randn(b, self.seq, self.cfg.hidden_size, generator=g).to(self.dev, torch.bfloat16)
        dy = torch.randn(b, self.seq, self.cfg.hidden_size, generator=g).to(self.dev, torch.bfloat16)
        return x.to(dtype), dy.to(dtype)

    @staticmethod
    def layer_of(model):
        return fast.decoder_layers(model)[0]

    def call(self, model, x):
        lm = fast.base_causal_lm(model)
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        pe = lm.model.rotary_emb(x, pos)
        layer = self.layer_of(model)

        def fwd():
            out = layer(x, position_embeddings=pe)
            return out[0] if isinstance(out, tuple) else out
        return fwd

    def outputs(self, model, b, dtype=torch.bfloat16) -> dict:
        """One forward + backward: the layer's update out - x, its input gradient's branch part dx - dy (the
        residual passes x and dy through exactly, which would dilute the errors), LoRA gradients (flattened)."""
        x, dy = self.inputs(b, dtype)
        x.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        out = self.call(model, x)()
        out.backward(dy)
        res = {"out": (out.detach().float() - x.detach().float()), "dx": (x.grad.detach().float() - dy.float()),
               "lora": torch.cat([p.grad.detach().float().flatten() for p in params])}
        for p in params:
            p.grad = None
        return res

    def fp32_reference(self, batches) -> None:
        m32 = copy.deepcopy(self.model).float()
        fast.configure_layers(m32, compile=False)
        for b in batches:
            self.refs[("fp32", b)] = self.outputs(m32, b, torch.float32)
        del m32
        gc.collect()

    def variant(self, name: str, settings, batches, use_compile: bool, compile_options: dict) -> list[dict]:
        rows = []
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = copy.deepcopy(self.model)
        if settings is not None:
            fp8.convert_model(model, settings)
        fast.configure_layers(model, compile=use_compile, compile_options=compile_options)
        layer = self.layer_of(model)
        weights = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
        params = [p for p in model.parameters() if p.requires_grad]
        for b in batches:
            row = {"variant": name, "batch": b, "settings": settings.describe() if settings else "bf16 (fast)",
                   "compiled": use_compile, "layer_weight_mib": weights / 2**20, "status": "ok"}
            try:
                x, dy = self.inputs(b)
                x.requires_grad_(True)
                fwd = self.call(model, x)

                def step():
                    fwd().backward(dy)

                def zero():
                    x.grad = None
                    for p in params:
                        p.grad = None
                t0 = time.perf_counter()
                zero()
                step()  # the first call compiles (forward and backward)
                sync(self.dev)
                row["first_call_s"] = time.perf_counter() - t0
                row.update(self.timer.run(step, self.args.iters, self.args.warmup, before=zero))
                zero()
                if self.dev.type == "cuda":
                    gc.collect()
                    torch.cuda.reset_peak_memory_stats(self.dev)
                    base = torch.cuda.memory_allocated(self.dev)
                    step()
                    sync(self.dev)
                    row["step_peak_mib"] = (torch.cuda.max_memory_allocated(self.dev) - base) / 2**20
                    zero()
                got = self.outputs(model, b)
                if settings is None and ("bf16", b) not in self.refs:  # the bf16 layer is the reference
                    self.refs[("bf16", b)] = got
                for ref in ("bf16", "fp32"):
                    r = self.refs.get((ref, b))
                    for k in ("out", "dx", "lora"):
                        row[f"err_{k}_vs_{ref}"] = rel(got[k], r[k]) if r else None
                row["layer_tok_s_x32"] = b * self.seq / (32 * row["ms"] / 1000)
                row["model_flops"] = layer_flops(self.cfg, b, self.seq)
                row["tflops_per_s"] = row["model_flops"] / (row["ms"] / 1000) / 1e12
            except Exception as e:  # noqa: BLE001 - recorded; the next variant runs
                row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                row["traceback"] = traceback.format_exc()[-2500:]
                log(row["traceback"])
                if self.dev.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            c = torch._dynamo.utils.counters
            row["graph_breaks"] = sum(c["graph_break"].values())
            row["unique_graphs"] = c["stats"].get("unique_graphs")
            rows.append(row)
            log(f"{name} b{b}: " + (f"{row['ms']:.2f} ms (cpu {row['cpu_issue_ms']:.2f}), first call {row['first_call_s']:.1f} s, "
                                  f"err out/dx vs bf16 {row.get('err_out_vs_bf16')}/{row.get('err_dx_vs_bf16')}"
                                  if row["status"] == "ok" else row["status"]))
        del model, layer, params
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    # ------------------------------------------------------------ LM head + chunked CE
    def heads(self, batches) -> list[dict]:
        rows = []
        lm = fast.base_causal_lm(self.model)
        w = lm.lm_head.weight.detach()
        V, H = w.shape
        chunk = self.args.ce_chunk
        for b in batches:
            T = b * self.seq
            g = torch.Generator().manual_seed(7 + b)
            h0 = torch.randn(T, H, generator=g).to(self.dev, torch.bfloat16)
            y = torch.randint(0, V, (T,), generator=g).to(self.dev)
            y[:: 17] = fast.IGNORE_INDEX
            h32 = h0.float().requires_grad_(True)
            loss32 = fast.chunked_linear_cross_entropy(h32, w.float(), y, chunk)
            loss32.backward()
            ref32 = (float(loss32), h32.grad.detach())
            ref16 = None
            for name, st in HEADS.items():
                row = {"head": name, "batch": b, "status": "ok"}
                try:
                    head = w if st is None else fp8.FP8Linear(fp8.FP8Weight(w, st), H, V)
                    h = h0.clone().requires_grad_(True)

                    def step():
                        fast.chunked_linear_cross_entropy(h, head, y, chunk).backward()

                    def zero():
                        h.grad = None
                    row.update(self.timer.run(step, self.args.iters, self.args.warmup, before=zero))
                    zero()
                    loss = fast.chunked_linear_cross_entropy(h, head, y, chunk)
                    loss.backward()
                    got = (float(loss), h.grad.detach())
                    if st is None:
                        ref16 = got
                    row["loss"] = got[0]
                    row["loss_rel_diff_vs_fp32"] = abs(got[0] - ref32[0]) / abs(ref32[0])
                    row["err_dh_vs_fp32"] = rel(got[1], ref32[1])
                    row["err_dh_vs_bf16"] = rel(got[1], ref16[1]) if ref16 else None
                    del head
                except Exception as e:  # noqa: BLE001
                    row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    row["traceback"] = traceback.format_exc()[-2500:]
                    log(row["traceback"])
                rows.append(row)
                log(f"LM head {name} b{b}: " + (f"{row['ms']:.2f} ms, dh err vs fp32 {row['err_dh_vs_fp32']:.4f}"
                                                if row["status"] == "ok" else row["status"]))
        return rows


# =================================================================== report

def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    L = [f"# FP8 frozen base vs bf16: one Llama-2-7B decoder layer ({res['gpu']})", "",
         f"- command: `{res['command']}`", f"- date: {res['date']}; versions: {res['versions']}",
         f"- shape: {res['shape']}; LoRA r{res['lora_r']} on q/v; compile: {res['compile']}; median of {res['iters']} "
         f"after {res['warmup']} warm-up (+ the compiling call)",
         "- errors: relative Frobenius norm of the layer's update (output - input), of the input gradient's branch part "
         "(dx - dy: the residual passes both through exactly) and of all LoRA gradients",
         f"- matmul peaks (n x n x n, n={res['peak_n']}): bf16 {fmt(res['peak_bf16_tflops'], '.0f')} TFLOP/s, fp8 rowwise "
         f"{fmt(res['peak_fp8_tflops'], '.0f')} TFLOP/s", "",
         "## Layer forward + backward", "",
         "| batch | variant | ms | speed-up vs bf16 | TFLOP/s | MFU % bf16 peak | MFU % fp8 peak | CPU issue ms | step peak MiB | layer weights MiB | "
         "err out vs bf16 | err dx vs bf16 | err LoRA grads vs bf16 | err out vs fp32 | err dx vs fp32 | err LoRA vs fp32 | "
         "32-layer tok/s bound | compiled | graph breaks | status |",
         "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    base = {r["batch"]: r["ms"] for r in res["layers"] if r["variant"] == "bf16" and r["status"] == "ok"}
    for r in sorted(res["layers"], key=lambda r: r["batch"] or 0):
        ok = r["status"] == "ok"
        sp = base.get(r["batch"]) / r["ms"] if ok and base.get(r["batch"]) else None
        tf = r.get("tflops_per_s")
        mfu = [100 * tf / p if tf and p else None for p in (res.get("peak_bf16_tflops"), res.get("peak_fp8_tflops"))]
        L.append(f"| {r['batch']} | {r['variant']} | {fmt(r.get('ms'))} | {fmt(sp)} | {fmt(tf, '.0f')} | {fmt(mfu[0], '.1f')} | "
                 f"{fmt(mfu[1], '.1f')} | {fmt(r.get('cpu_issue_ms'))} | "
                 f"{fmt(r.get('step_peak_mib'), '.0f')} | {fmt(r.get('layer_weight_mib'), '.0f')} | "
                 + " | ".join(fmt(r.get(f"err_{k}_vs_{ref}"), ".4f") for ref in ("bf16", "fp32") for k in ("out", "dx", "lora"))
                 + f" | {fmt(r.get('layer_tok_s_x32'), ',.0f')} | {r.get('compiled')} | {r.get('graph_breaks')} | {r['status'][:80]} |")
    L += ["", "Settings per variant: " + "; ".join(f"**{k}**: {v.describe() if v else 'bf16 (fast)'}"
                                                  for k, v in VARIANTS.items() if k in {r['variant'] for r in res['layers']}), ""]
    if res.get("gemm_floor_summary"):
        L += ["## GEMM floor: the frozen linears' GEMMs alone (forward + input gradients, one layer)", "",
              "| batch | fused q/k/v, gate/up | bf16 ms | fp8 ms | speed-up |", "| ---: | --- | ---: | ---: | ---: |"]
        for r in res["gemm_floor_summary"]:
            L.append(f"| {r['batch']} | {r['fused']} | {fmt(r['bf16_ms'])} | {fmt(r['fp8_ms'])} | {fmt(r['speedup'])} |")
        L += ["", "| batch | GEMM | M x N x K | bf16 TFLOP/s | fp8 TFLOP/s |", "| ---: | --- | --- | ---: | ---: |"]
        seen = set()
        for r in res["gemm_floor"]:
            key = (r["batch"], r["gemm"], r["M"], r["N"], r["K"])
            if key in seen or r["kind"] != "bf16":
                continue
            seen.add(key)
            f8 = next(x for x in res["gemm_floor"] if (x["batch"], x["gemm"], x["M"], x["N"], x["K"]) == key and x["kind"] == "fp8")
            L.append(f"| {r['batch']} | {r['gemm']} | {r['M']} x {r['N']} x {r['K']} | {fmt(r['tflops'], '.0f')} | {fmt(f8['tflops'], '.0f')} |")
        L.append("")
    if res.get("heads"):
        L += ["## LM head + chunked cross-entropy (loralab.fast), forward + backward", "",
              "| batch | head | ms | speed-up vs bf16 | loss rel. diff vs fp32 | err dh vs fp32 | err dh vs bf16 | status |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        hb = {r["batch"]: r["ms"] for r in res["heads"] if r["head"] == "bf16" and r["status"] == "ok"}
        for r in res["heads"]:
            ok = r["status"] == "ok"
            sp = hb.get(r["batch"]) / r["ms"] if ok and hb.get(r["batch"]) else None
            L.append(f"| {r['batch']} | {r['head']} | {fmt(r.get('ms'))} | {fmt(sp)} | {fmt(r.get('loss_rel_diff_vs_fp32'), '.2e')} | "
                     f"{fmt(r.get('err_dh_vs_fp32'), '.4f')} | {fmt(r.get('err_dh_vs_bf16'), '.4f')} | {r['status'][:80]} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset shape, seq 16: the same code path in about a minute")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the chunked cross-entropy (fast's)")
    ap.add_argument("--variants", default="", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--no-compile", action="store_true", help="eager layers (default: compiled, as fast on CUDA)")
    ap.add_argument("--no-floor", action="store_true", help="skip the GEMM-floor table")
    ap.add_argument("--all-batches", action="store_true", help="every variant at every batch size (default: the "
                    "ablations at the largest only)")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new variant after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = preset_config("tiny" if args.smoke else "llama2-7b")
    cfg.num_hidden_layers = 1
    if args.smoke:  # Inductor on a CPU takes minutes per layer: the smoke compiles with dynamo + AOTAutograd only
        args.seq_len, args.iters, args.warmup, args.batch_sizes = 16, 1, 0, [1, 2]
    names = [n.strip() for n in args.variants.split(",") if n.strip()] or list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"--variants {bad}: expected names from {list(VARIANTS)}")
    if "bf16" in names:
        names.remove("bf16")
    names.insert(0, "bf16")  # the reference runs first
    use_compile = not args.no_compile
    # fast8's own compile options (loralab.fast.compile_options), as training compiles; one static graph per
    # batch size, as a training process (one batch size) has, so automatic dynamic shapes are off here
    compile_options = fast.compile_options(get_recipe("fast8")) | ({"backend": "aot_eager"} if args.smoke else {})
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.machine()})"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "peft", "triton"):
        try:
            import importlib.metadata as md
            versions[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = "not installed"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    base = out / f"fp8_layer_{gpu.replace('NVIDIA ', '').split(' ')[0] if cuda else 'smoke'}_{stamp}"
    res = {"command": "python benchmarks/fp8_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "versions": versions,
           "shape": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                     "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "seq_len": args.seq_len},
           "lora_r": get_recipe("fast").lora_r, "compile": str(compile_options) if use_compile else "off",
           "iters": args.iters, "warmup": args.warmup, "batch_sizes": args.batch_sizes,
           "variants": {k: (v.describe() if v else "bf16 (fast)") for k, v in VARIANTS.items()},
           "layers": [], "heads": [], "gemm_floor": [], "gemm_floor_summary": []}

    LOG[:] = [base.with_suffix(".log")]

    def write() -> None:
        res["elapsed_s"] = time.perf_counter() - t_start
        base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
        base.with_suffix(".md").write_text(markdown(res))

    log(f"fp8_layer on {gpu}: torch {torch.__version__}, variants {names}, batches {args.batch_sizes}")
    if cuda:
        res["fp8_device"] = fp8.check_device(dev, BEST)  # the guard apply_fp8 runs (raises on a GPU without FP8)
    res["peak_n"] = n_peak = 256 if args.smoke else 8192
    res["peak_bf16_tflops"] = measure_matmul_peak(dev, torch.bfloat16, n=n_peak)
    res["peak_fp8_tflops"] = measure_matmul_peak(dev, torch.float8_e4m3fn, n=n_peak)
    log(f"matmul peaks: bf16 {res['peak_bf16_tflops']:.1f}, fp8 {res['peak_fp8_tflops']:.1f} TFLOP/s")
    timer = Timer(dev)
    if not args.no_floor:
        res["gemm_floor"] = gemm_floor(cfg, args.batch_sizes, args.seq_len, dev, timer, 1 if args.smoke else args.iters,
                                       1 if args.smoke else 10)
        res["gemm_floor_summary"] = floor_summary(res["gemm_floor"])
        for r in res["gemm_floor_summary"]:
            log(f"GEMM floor b{r['batch']} fused={r['fused']}: bf16 {r['bf16_ms']:.2f} ms, fp8 {r['fp8_ms']:.2f} ms")
    write()
    bench = LayerBench(cfg, dev, args.seq_len, args)
    bench.fp32_reference(args.batch_sizes)
    res["heads"] = bench.heads(args.batch_sizes)
    write()
    for name in names:
        if time.perf_counter() - t_start > args.budget_s:
            res["layers"].append({"variant": name, "batch": None, "status": f"skipped: budget {args.budget_s:.0f} s spent"})
            log(f"{name}: skipped (budget)")
            write()
            continue
        batches = args.batch_sizes if (args.all_batches or name in EVERY_BATCH) else [max(args.batch_sizes)]
        rows = bench.variant(name, VARIANTS[name], batches, use_compile, compile_options)
        res["layers"] += rows
        write()
        if use_compile and any(r["status"] != "ok" for r in rows):  # e.g. an Inductor lowering: still measure it eager
            log(f"{name}: failed compiled; running it eager")
            res["layers"] += bench.variant(f"{name} [eager]", VARIANTS[name], batches, False, compile_options)
            write()
    write()
    md = base.with_suffix(".md").read_text()
    print(md)
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
