"""loralab.fp8 on CPU (torch's CPU _scaled_mm): the frozen FP8 base's numerics, its switches, its guard, its memory.

Tolerances. e4m3 keeps 3 mantissa bits: round-to-nearest moves a normal value by at most u = 2^-4 of itself,
a subnormal one (below 2^-6 in the scaled units where the row's amax is 448) by at most half the smallest
step, 2^-10 units. A dot product of two quantised vectors then obeys, per output element,
    |x^ . w^ - x . w| <= (2u + u^2) sum|x||w| + e_x sum|w| (1+u) + e_w sum|x| (1+u) + K e_x e_w     (*)
with e = scale * 2^-10 (scale = amax / 448 of that row), plus fp32 accumulation (K 2^-24 sum|x^ w^|, negligible)
and the bf16 rounding of the output (2^-8 |y|). (*) is a guarantee, not an estimate; typical errors are far
smaller: for Gaussian data the RMS relative rounding error of one e4m3 operand is ~2^-3 / sqrt(12) / 1.4
~ 0.026 (measured 0.0258), so a GEMM of two independently rounded operands has relative Frobenius error
~ sqrt(2) x 0.026 ~ 0.037; the tests bound it by 0.05, which a scale or rounding bug exceeds (truncation
instead of rounding doubles it).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loralab import fast, fp8, memory
from loralab.config import ConfigError, get_recipe
from loralab.shape import preset_config
from loralab.model import build_random_model
from loralab.profilers import random_batch as _random_batch


def build_lora_model(config, recipe, device="cpu", seed=0):
    return build_random_model(config, recipe, torch.device(device), seed=seed)


def random_batch(*a, **kw):
    return _random_batch(*a, **kw)["input_ids"]

U = 2.0 ** -4
BF16_U = 2.0 ** -8
ROWWISE = fp8.FP8Settings()


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def bound(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(*) of the module docstring for y ~ a @ b^T with a, b rowwise-quantised, plus the bf16 output rounding."""
    a, b = a.float(), b.float()
    ea = a.abs().amax(dim=1, keepdim=True) / fp8.E4M3_MAX * 2.0 ** -10
    eb = b.abs().amax(dim=1, keepdim=True) / fp8.E4M3_MAX * 2.0 ** -10
    k = a.shape[1]
    mm = (2 * U + U * U) * (a.abs() @ b.abs().t()) + (1 + U) * (ea * b.abs().sum(1)[None] + a.abs().sum(1)[:, None] * eb.t()) \
        + k * ea * eb.t()
    return mm + BF16_U * y.float().abs() + 1e-6


def data(m=64, k=96, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, m)[:, None]  # rows over 5 decades: rowwise scales must follow them
    x = (torch.randn(m, k, generator=g) * scale).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    return x, w


def tiny(layers=1):
    cfg = preset_config("tiny")
    cfg.num_hidden_layers = layers
    return cfg


def tiny_model(layers=1, seed=0):
    # liger off: on a CUDA machine with liger-kernel, "auto" would patch Liger's Triton kernels into this CPU model
    # (process-wide); fast8 trains compiled on CUDA, where Liger is off too
    m = build_lora_model(tiny(layers), get_recipe("fast").replace(liger="off"), "cpu", seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at 0: give it values so A gets gradients too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_quantize_error_within_e4m3_rounding(scaling):
    x, _ = data()
    q, s = fp8.quantize(x, scaling)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == ((x.shape[0], 1) if scaling == "rowwise" else ())
    amax = x.float().abs().amax(dim=-1, keepdim=True) if scaling == "rowwise" else x.float().abs().amax()
    assert torch.equal(q.float().abs().amax(dim=-1, keepdim=True) if scaling == "rowwise" else q.float().abs().amax(),
                       torch.full_like(amax, fp8.E4M3_MAX))  # each row's (the tensor's) amax maps to 448
    err = (q.float() * s - x.float()).abs()
    assert (err <= U * x.float().abs() + s * 2.0 ** -10 + 1e-12).all()
    zq, zs = fp8.quantize(torch.zeros(3, 16), scaling)  # an all-zero row: zeros, finite scale
    assert zq.float().abs().sum() == 0 and torch.isfinite(zs).all()


def test_fp8_linear_forward_and_input_grad_within_bound():
    x, w = data()
    fw = fp8.FP8Weight(w, ROWWISE)
    xr = x.clone().requires_grad_(True)
    y = fp8.fp8_matmul(xr, fw)
    ref = x.float() @ w.float().t()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs() <= bound(x, w, y)).all()
    assert rel(y, ref) < 0.05
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    y.backward(dy)
    dref = dy.float() @ w.float()
    # dx = (dy diag(s_w)) Wq: dy is rounded per token after the fold, W is the forward's dequantised weight
    assert ((xr.grad.float() - dref).abs() <= bound(dy, w.t().contiguous(), xr.grad)).all()
    assert rel(xr.grad, dref) < 0.05
    assert not fw.weight.requires_grad and fw.weight.grad is None  # frozen: no weight-gradient GEMM


def test_tensorwise_linear_close():
    x, w = data(seed=1)
    x = x / x.float().abs().amax(dim=1, keepdim=True).bfloat16()  # rows of similar range: tensorwise's case
    y = fp8.fp8_matmul(x, fp8.FP8Weight(w, ROWWISE.replace(scaling="tensorwise")))
    assert rel(y, x.float() @ w.float().t()) < 0.05


def test_weight_t_copy_and_per_step_give_the_same_dx():
    x, w = data(seed=2)
    grads = []
    for wt in ("copy", "per-step"):
        fw = fp8.FP8Weight(w, ROWWISE.replace(weight_t=wt))
        assert (fw.weight_t is not None) == (wt == "copy")
        xr = x.clone().requires_grad_(True)
        fp8.fp8_matmul(xr, fw).backward(torch.ones(x.shape[0], w.shape[0], dtype=torch.bfloat16))
        grads.append(xr.grad)
    assert torch.equal(grads[0], grads[1])  # the same FP8 values, transposed once or every step


def test_fused_rows_equal_separate_weights():
    """Rowwise scales are per output row: a slice of the fused FP8 weight is the per-module FP8 weight."""
    x, w = data(n=96, seed=4)
    fused = fp8.FP8Weight(w, ROWWISE, splits=(32, 64))
    part = fp8.FP8Weight(w[32:], ROWWISE)
    assert torch.equal(fused.weight[32:].float(), part.weight.float())
    assert torch.equal(fused.scale[:, 32:], part.scale)
    xr = x.clone().requires_grad_(True)
    y = fp8.fp8_matmul(xr, fused, rows=(32, 96))
    assert torch.equal(y, fp8.fp8_matmul(x, part))
    y.float().sum().backward()  # the slice's backward transposes per step
    xp = x.clone().requires_grad_(True)
    fp8.fp8_matmul(xp, part).float().sum().backward()
    assert torch.equal(xr.grad, xp.grad)


# ---------------------------------------------------------------- LoRA on the FP8 base

def lora_toy(n_in=64, n_out=48, seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16)

    torch.manual_seed(seed)
    m = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), Toy())
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    with torch.no_grad():
        m.proj.lora_B["default"].weight.normal_(0, 0.1)
    fast.lora_in_input_dtype(m)  # as fast: bf16 adapter matmuls, fp32 adapter weights
    return m


def test_lora_grads_flow_and_match_bf16_reference():
    """y = base(x) + B A x; with a loss linear in y, dy is exact, so the LoRA gradients (dy^T (A x), ...) carry
    no FP8 error: they must match the bf16 model's to bf16 rounding. dx gets the FP8 error of the base part."""
    ref = lora_toy()
    m = copy.deepcopy(ref)
    fp8._convert_group(m, ("proj",), None, ROWWISE, "toy")
    assert isinstance(m.proj.base_layer, fp8.FP8Linear)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 64, generator=g).bfloat16()
    r = torch.randn(2, 16, 48, generator=g).bfloat16()
    out = {}
    for name, mod in (("bf16", ref), ("fp8", m)):
        xr = x.clone().requires_grad_(True)
        (mod.proj(xr).float() * r.float()).sum().backward()
        out[name] = {"dx": xr.grad, **{n: p.grad for n, p in mod.named_parameters() if p.requires_grad}}
    lora_keys = [k for k in out["bf16"] if "lora" in k]
    assert lora_keys and all(out["fp8"][k] is not None and out["fp8"][k].abs().sum() > 0 for k in lora_keys)
    for k in lora_keys:
        torch.testing.assert_close(out["fp8"][k], out["bf16"][k], rtol=2e-2, atol=1e-4, msg=k)
    assert rel(out["fp8"]["dx"], out["bf16"]["dx"]) < 0.05
    # the shared-input path (lora_delta + one quantisation) is peft's forward, bit for bit
    (y_shared,) = fp8.shared_input_outputs(x, [m.proj], None)
    assert torch.equal(y_shared, m.proj(x))


@pytest.fixture(scope="module")
def tiny_fp8_models():
    base = tiny_model()
    models = {"bf16": base}
    for name, st in {"fused": ROWWISE, "shared": ROWWISE.replace(fused=False),
                     "per_gemm": ROWWISE.replace(fused=False, shared_quant=False),
                     "per_step": ROWWISE.replace(weight_t="per-step")}.items():
        m = copy.deepcopy(base)
        fp8.convert_model(m, st)
        models[name] = m
    return models


def step(model, ids):
    loss = fast.forward_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                             get_recipe("fast"))
    loss.backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), g


def test_shared_quantisation_equals_per_gemm_and_transposes_agree(tiny_fp8_models):
    ids = random_batch(tiny().vocab_size, 2, 32, torch.device("cpu"), seed=3)
    res = {k: step(m, ids) for k, m in tiny_fp8_models.items() if k != "bf16"}
    for a, b in (("shared", "per_gemm"), ("fused", "per_step")):
        assert res[a][0] == res[b][0], (a, b)
        for k in res[a][1]:
            assert torch.equal(res[a][1][k], res[b][1][k]), (a, b, k)
    # fused = separate GEMMs over the same FP8 values; only the CPU kernel's summation order may differ
    assert res["fused"][0] == pytest.approx(res["shared"][0], rel=1e-4)


def test_fp8_model_trains_like_bf16(tiny_fp8_models):
    """End to end (2 layers' worth of FP8 GEMMs between the loss and each LoRA weight): the loss within 0.1 %,
    the LoRA gradients within 15 % (each FP8 GEMM on the gradient's path adds ~3.7 %, in quadrature; bf16's
    own error is ~1 %). Measured here: loss 4e-5, gradients 3-8 %."""
    ids = random_batch(tiny().vocab_size, 2, 32, torch.device("cpu"), seed=4)
    l16, g16 = step(tiny_fp8_models["bf16"], ids)
    l8, g8 = step(tiny_fp8_models["fused"], ids)
    assert l8 == pytest.approx(l16, rel=1e-3)
    assert g8.keys() == g16.keys() and len(g8) == 4
    for k in g16:
        assert g8[k].abs().sum() > 0 and rel(g8[k], g16[k]) < 0.15, k
    assert not any(p.requires_grad for n, p in tiny_fp8_models["fused"].named_parameters() if "lora_" not in n)


def test_generation_path_uses_the_fused_weights_per_module(tiny_fp8_models):
    """With a KV cache the attention runs HF's forward through each projection's FP8 slice: same logits."""
    from transformers import DynamicCache

    m = tiny_fp8_models["fused"]
    ids = random_batch(tiny().vocab_size, 1, 12, torch.device("cpu"), seed=6)
    sliced = []
    orig = fp8.FP8Linear.forward

    def counting(self, x):
        sliced.append(self.rows)
        return orig(self, x)
    fp8.FP8Linear.forward = counting
    try:
        with torch.no_grad():
            plain = m(input_ids=ids).logits
            assert sliced == [None, None]  # training path: q/k/v fused (not per module); o_proj, down_proj
            cached = m(input_ids=ids, past_key_values=DynamicCache(config=m.config), use_cache=True).logits
    finally:
        fp8.FP8Linear.forward = orig
    assert sliced[2:] == [(0, 128), (128, 256), (256, 384), None, None]  # q, k, v: their rows of the fused weight
    torch.testing.assert_close(cached, plain, rtol=2e-2, atol=2e-2)


def test_fp8_lm_head_in_chunked_and_hf_losses():
    base = tiny_model()
    m = copy.deepcopy(base)
    info = fp8.convert_model(m, ROWWISE.replace(lm_head=True))
    assert isinstance(fast.base_causal_lm(m).lm_head, fp8.FP8Linear) and info["linears"] == 8
    ids = random_batch(tiny().vocab_size, 2, 32, torch.device("cpu"), seed=7)
    l16, _ = step(base, ids)
    l8, g8 = step(m, ids)  # chunked loss: the head's FP8 matmuls
    assert l8 == pytest.approx(l16, rel=1e-3) and all(v.abs().sum() > 0 for v in g8.values())
    hf = fast.forward_loss(m, {"input_ids": ids, "labels": ids}, get_recipe("fast").replace(cross_entropy="hf"))
    assert float(hf) == pytest.approx(l8, rel=1e-3)


def test_chunked_ce_with_fp8_head_matches_reference():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(40, 64, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(96, 64, generator=g) * 0.1).bfloat16()
    y = torch.randint(0, 96, (40,), generator=g)
    y[::7] = fast.IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(h.float() @ w.float().t(), y, ignore_index=fast.IGNORE_INDEX)
    (dref,) = torch.autograd.grad(ref, h)
    head = fp8.FP8Linear(fp8.FP8Weight(w, ROWWISE), 64, 96)
    out = fast.chunked_linear_cross_entropy(h, head, y, 16)
    (dh,) = torch.autograd.grad(out, h)
    assert float(out) == pytest.approx(float(ref), rel=5e-3)
    assert rel(dh, dref) < 0.05


# ---------------------------------------------------------------- memory: what is saved for backward

def saved_bytes_eager(model, x, pe) -> int:
    """Bytes autograd keeps for one decoder layer's forward (by storage; parameters and buffers excluded)."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    layer = fast.decoder_layers(model)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=pe)
    del out
    return sum(seen.values())


def layer_inputs(model, b=2, s=32):
    lm = fast.base_causal_lm(model)
    x = torch.randn(b, s, lm.config.hidden_size, generator=torch.Generator().manual_seed(9)).bfloat16().requires_grad_(True)
    pe = lm.model.rotary_emb(x, torch.arange(s)[None].expand(b, s))
    return x, pe


def test_eager_fp8_layer_saves_what_bf16_saves(tiny_fp8_models):
    x, pe = layer_inputs(tiny_fp8_models["bf16"])
    ref = saved_bytes_eager(tiny_fp8_models["bf16"], x, pe)
    for k in ("fused", "shared", "per_gemm", "per_step"):
        assert saved_bytes_eager(tiny_fp8_models[k], x, pe) == ref, k


def compiled_saved_bytes(model) -> int:
    """Bytes the min-cut partitioner saves for one compiled decoder layer (AOTAutograd's forward-graph outputs
    beyond the layer output that are not graph inputs: parameters, buffers and the layer input excluded)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    got = []

    def fw(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
        got.append(sum(o.meta["val"].numel() * o.meta["val"].element_size() for o in out[1:]
                       if o is not None and o not in inputs and isinstance(o.meta.get("val"), torch.Tensor)))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    fast.configure_layers(model, compile=True, compile_options={"backend": aot_autograd(
        fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=min_cut_rematerialization_partition)})
    try:
        x, pe = layer_inputs(model)
        fast.decoder_layers(model)[0](x, position_embeddings=pe).float().sum().backward()
    finally:
        fast.configure_layers(model, compile=False)
        torch._dynamo.reset()
    assert got, "no forward graph compiled"
    return got[0]


def test_compiled_fp8_layer_saves_what_bf16_saves(tiny_fp8_models):
    """fp8.layer_saved_bytes_per_token's claim, checked on the partitioned graph torch.compile builds."""
    ref = compiled_saved_bytes(copy.deepcopy(tiny_fp8_models["bf16"]))
    for k in ("fused", "per_step"):
        assert compiled_saved_bytes(copy.deepcopy(tiny_fp8_models[k])) == ref, k


def test_memory_terms_for_known_shapes():
    assert fp8.linear_weight_bytes(4096, 4096, "rowwise", "copy") == 2 * 4096 * 4096 + 4 * 8192
    assert fp8.linear_weight_bytes(4096, 4096, "rowwise", "per-step") == 4096 * 4096 + 4 * 8192
    assert fp8.linear_weight_bytes(11008, 4096, "tensorwise", "copy") == 2 * 11008 * 4096 + 4
    cfg = preset_config("llama2-7b")
    r8 = get_recipe("fast8")
    t = fp8.weight_terms(cfg, r8)
    # per layer, fused: qkv 4096 -> 12288, o 4096 -> 4096, gate/up 4096 -> 22016, down 11008 -> 4096
    layer = (2 * (4096 * 12288 + 4096 * 4096 + 4096 * 22016 + 11008 * 4096)
             + 4 * ((12288 + 4096) + (4096 + 4096) + (22016 + 4096) + (4096 + 11008)))
    assert t["weights_fp8_linear"][0] == 32 * layer == 12_960_432_128
    assert t["weights_embed_head_norms"][0] == 2 * (2 * 32000 * 4096 + 65 * 4096)
    bf16 = memory.weight_terms(cfg, get_recipe("fast"))
    assert t["weights_fp8_linear"][0] - bf16["weights_linear"][0] == 32 * 4 * 65792  # W^T kept: bf16's bytes + scales
    per_step = fp8.weight_terms(cfg, r8.replace(fp8_weight_t="per-step", fp8_lm_head=True))
    assert per_step["weights_fp8_linear"][0] == 32 * ((layer - 4 * 65792) // 2 + 4 * 65792)
    assert per_step["weights_lm_head_fp8"][0] == 32000 * 4096 + 4 * (32000 + 4096)
    assert per_step["weights_embed_head_norms"][0] == 2 * (32000 * 4096 + 65 * 4096)
    # activations: the bf16 layer's (see the two saved-tensor tests), 7aH + 2aI + small at 7B compiled
    assert fp8.layer_saved_bytes_per_token(cfg, r8, 2048) == memory.layer_saved_bytes_per_token(cfg, get_recipe("fast"), 2048)
    assert fp8.backward_transient_bytes(cfg, r8, 2048) == 2048 * (22016 + 4)
    assert fp8.backward_transient_bytes(cfg, r8.replace(fp8_weight_t="per-step"), 2048) == 2048 * (22016 + 4) + 22016 * 4096


# ---------------------------------------------------------------- recipe, guard, reporting

def test_fast8_recipe_and_validation():
    r = get_recipe("fast8")
    assert (r.fp8, r.fp8_weight_t, r.fp8_fused, r.fp8_shared_quant, r.fp8_lm_head) == ("rowwise", "copy", True, True, False)
    assert r.replace(fp8="off", name="x", about="") == get_recipe("fast").replace(name="x", about="")  # fast8 = fast + FP8
    assert get_recipe("fast").fp8 == "off" and get_recipe("seed").fp8 == "off"
    for bad, match in ((dict(fp8="e5m2"), "fp8="), (dict(fp8_weight_t="twice"), "fp8_weight_t"),
                       (dict(param_dtype="float32"), "param_dtype='bfloat16'"),
                       (dict(fp8_lm_head=True, cross_entropy="liger"), "fp8_lm_head")):
        with pytest.raises(ConfigError, match=match):
            r.replace(**bad)
    with pytest.raises(ConfigError, match="quantization='none'"):
        get_recipe("seed").replace(fp8="rowwise", param_dtype="bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_guard_on_cpu_is_one_line_naming_fast():
    with pytest.raises(ConfigError) as e:
        build_lora_model(tiny(), get_recipe("fast8"), "cpu")  # add_lora -> fast.apply_levers -> fp8.apply_fp8
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("recipe fast8: needs a GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100/H200/L40S/"
                   "RTX 4090); this is cpu. Use --recipe fast.")
    ok, what = fp8.fp8_status(torch.device("cpu"))
    assert not ok and what == "cpu"


def test_levers_and_merge_refusal(tiny_fp8_models):
    from loralab.adapter import merge_adapter, quantization_of

    assert build_lora_model(tiny(), get_recipe("fast"), "cpu").loralab_levers["fp8"] == "off"
    assert quantization_of(tiny_fp8_models["fused"]) == "fp8" and quantization_of(tiny_fp8_models["bf16"]) == "none"
    with pytest.raises(ConfigError, match="fp8-quantized"):
        merge_adapter(tiny_fp8_models["fused"])


def test_convert_refuses_what_it_cannot_hold():
    m = tiny_model()
    fast.base_causal_lm(m).model.layers[0].self_attn.o_proj.bias = nn.Parameter(torch.zeros(128, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="o_proj is Linear with a bias"):
        fp8.convert_model(m, ROWWISE)


def test_fp8_matmul_peak_measures_on_cpu():
    from loralab.profilers import measure_matmul_peak

    assert measure_matmul_peak("cpu", torch.float8_e4m3fn, n=64, iters=1) > 0


@pytest.mark.slow
def test_fp8_layer_benchmark_smoke(tmp_path):
    """benchmarks/fp8_layer.py --smoke: every section runs and is recorded (CPU: dynamo + AOTAutograd compile)."""
    spec = importlib.util.spec_from_file_location("fl", Path(__file__).parents[1] / "benchmarks" / "fp8_layer.py")
    fl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fl)
    assert fl.BEST == fp8.FP8Settings.of(get_recipe("fast8"))
    assert len(fl.gemm_shapes(preset_config("llama2-7b"), 2048, fused=True)) == 8
    assert fl.main(["--smoke", "--out", str(tmp_path), "--variants", "fp8,fp8 W^T per step"]) == 0
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = res["layers"]
    assert {(r["variant"], r["batch"]) for r in rows} == {("bf16", 1), ("bf16", 2), ("fp8", 1), ("fp8", 2), ("fp8 W^T per step", 2)}
    assert all(r["status"] == "ok" and r["graph_breaks"] == 0 for r in rows)
    fp8_rows = [r for r in rows if r["variant"] != "bf16"]
    assert all(0 < r["err_dx_vs_bf16"] < 0.5 and r["err_lora_vs_fp32"] < 0.5 for r in fp8_rows)
    assert {r["head"] for r in res["heads"]} == set(fl.HEADS) and all(r["status"] == "ok" for r in res["heads"])
    assert res["gemm_floor_summary"] and (tmp_path / next(tmp_path.glob("*.md")).name).read_text().count("| fp8 |") == 2
    assert next(tmp_path.glob("*.log")).read_text().count("\n") >= 10


# ---------------------------------------------------------------- compiled: one graph per decoder layer

def cpu_rowwise_scaled_mm() -> bool:
    """torch 2.13's CPU ``_scaled_mm`` takes rowwise scales; torch 2.11's takes per-tensor scales only."""
    try:
        fp8.fp8_matmul(torch.randn(4, 16, dtype=torch.bfloat16), fp8.FP8Weight(torch.randn(8, 16), ROWWISE))
        return True
    except RuntimeError:
        return False


def fp8_devices() -> list[str]:
    """CPU where its ``_scaled_mm`` takes rowwise scales (CI's torch); CUDA where FP8 tensor cores are (the GPU machine)."""
    devs = ["cpu"] if cpu_rowwise_scaled_mm() else []
    if torch.cuda.is_available() and fp8.fp8_status(torch.device("cuda"))[0]:
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", fp8_devices())
def test_compiled_fp8_decoder_layer_is_one_graph(device):
    """fast8's decoder layer under torch.compile with the recipe's own compile options: forward and backward in one
    Dynamo graph, no break. The breaks depend on Dynamo's version: torch 2.11 broke at every FP8 linear's backward
    (``tuple.pop`` on the saved tensors) and skipped the attention frame (an import inside it); torch 2.13 traced
    both. The backend does not decide breaks: CPU runs AOTAutograd without Inductor's C++ build, CUDA runs Inductor."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = torch.device(device)
    model = copy.deepcopy(tiny_model()).to(dev)
    fp8.convert_model(model, fp8.FP8Settings.of(get_recipe("fast8")))
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast.configure_layers(model, compile=True, compile_options=fast.compile_options(get_recipe("fast8")) | {"backend": counter})
    try:
        x, pe = layer_inputs(model)
        x, pe = x.detach().to(dev).requires_grad_(True), tuple(t.to(dev) for t in pe)
        fast.decoder_layers(model)[0](x, position_embeddings=pe)[0].float().sum().backward()
    finally:
        fast.configure_layers(model, compile=False)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    assert breaks == {}, breaks
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for one decoder layer"
    assert x.grad is not None and torch.isfinite(x.grad).all()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and all(g.abs().sum() > 0 for g in lora_grads)


def test_fp8_attention_forward_matches_transformers_llama_attention(tiny_fp8_models):
    """fp8._attention_forward re-implements LlamaAttention.forward around one shared FP8 q/k/v GEMM: pinned against
    transformers' own LlamaAttention (fp32) holding the same weights (the FP8 values dequantised, LoRA merged), so a
    transformers upgrade that changes RoPE, the attention call or the head layout shows here. The inputs are chosen
    so their FP8 quantisation is exact (each row's entries in {-2..2} with amax 2: x * 448 / 2 is an e4m3 value), and
    o_proj is left out of both (its input's quantisation is not exact); what remains is bf16 rounding of q/k/v and of
    attention (~2^-8 relative; measured 0.37 %, bar 1 %). Dropping RoPE, for one, moves the output by 9.4 %."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    m = copy.deepcopy(tiny_fp8_models["fused"])
    lm = fast.base_causal_lm(m)
    attn = lm.model.layers[0].self_attn
    cfg = lm.config
    fw = attn.fp8_qkv
    dense = fw.weight.float() * fw.scale.reshape(-1, 1).float()  # (Hq + 2 Hkv, H): the FP8 values as the GEMM reads them
    ref = LlamaAttention(cfg, layer_idx=0).float().eval()
    with torch.no_grad():
        for name, w in zip(("q_proj", "k_proj", "v_proj"), dense.split(fw.splits, dim=0)):
            mod = getattr(attn, name)
            d = fp8.lora_delta(mod, torch.eye(cfg.hidden_size, dtype=torch.bfloat16))  # the LoRA map applied to e_i
            getattr(ref, name).weight.copy_(w + (d.float().t() if d is not None else 0))
    attn.o_proj, ref.o_proj = nn.Identity(), nn.Identity()
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-2, 3, (2, 24, cfg.hidden_size), generator=g).float()
    x[..., 0] = 2.0
    pos = torch.arange(24)[None].expand(2, 24)
    cos, sin = lm.model.rotary_emb(x, pos)
    attn.eval()
    with torch.no_grad():
        got, _ = attn(x.bfloat16(), position_embeddings=(cos.bfloat16(), sin.bfloat16()), attention_mask=None)
        want, _ = ref(x, position_embeddings=(cos.float(), sin.float()), attention_mask=None)
    assert got.shape == want.shape
    assert rel(got, want) < 0.01
