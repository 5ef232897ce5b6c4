"""The fast recipe's levers on CPU at tiny size: each one keeps the loss and the gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from loralab import fast
from loralab.config import ConfigError, get_recipe
from loralab.model import build_random_model
from loralab.profilers import random_batch, step_module
from loralab.shape import preset_config
from loralab.train import forward_backward


def build_lora_model(config, recipe, device="cpu", seed=0):
    return build_random_model(config, recipe, torch.device(device), seed=seed)

PLAIN = get_recipe("fast").replace(  # plain HF + PEFT bf16, as a user writes it, dropout 0 for exactness
    name="plain", lora_dropout=0.0, cross_entropy="hf", liger="off", compile="off", lora_matmul_dtype="adapter")


def tiny(layers: int = 2):
    cfg = preset_config("tiny")
    cfg.num_hidden_layers = layers
    return cfg


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def step(model, recipe, ids, labels=None):
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids if labels is None else labels}
    loss = forward_backward(step_module(model, recipe), batch)
    g = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), g


def nonzero_b(model, seed=1):
    """LoRA B starts at zero (so A gets no gradient): give it values so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def assert_grads_close(a, b, rtol, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].abs().sum() > 0, f"zero gradient {k}"
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ---------------------------------------------------------------- chunked cross-entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_ce_matches_torch(dtype, chunk):
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = torch.randn(v, h, dtype=dtype) * 0.3
    y = torch.randint(0, v, (n,))
    y[::5] = -100
    ref = torch.nn.functional.cross_entropy((x @ w.t()).float(), y, ignore_index=-100)
    (gx_ref,) = torch.autograd.grad(ref, x)
    out = fast.chunked_linear_cross_entropy(x, w, y, chunk)
    (gx,) = torch.autograd.grad(out * 3.0, x)  # a non-unit upstream grad
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, 3.0 * gx_ref, rtol=tol, atol=tol)


def test_chunked_ce_weight_grad_and_all_ignored():
    torch.manual_seed(0)
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (12,))
    assert torch.autograd.gradcheck(lambda a, b: fast.chunked_linear_cross_entropy(a, b, y, 5), (x, w))
    z = fast.chunked_linear_cross_entropy(x, w, torch.full((12,), -100), 5)
    z.backward()
    assert float(z) == 0.0 and float(x.grad.abs().sum()) == 0.0


def test_shift_labels_is_hf():
    y = torch.tensor([[5, 6, 7, -100]])
    assert fast.shift_labels(y).tolist() == [[6, 7, -100, -100]]


def test_doc_position_ids():
    ids = torch.tensor([[9, 9, 1, 4, 5, 1, 6], [1, 2, 3, 4, 5, 6, 7]])
    assert fast.doc_position_ids(ids, bos_id=1).tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


# ---------------------------------------------------------------- levers on a tiny model

@pytest.fixture(scope="module")
def plain_and_ids():
    cfg = tiny()
    torch.manual_seed(0)
    m = build_lora_model(cfg, PLAIN.replace(param_dtype="float32"), "cpu", seed=0)
    nonzero_b(m)
    ids = random_batch(cfg.vocab_size, 2, 64, torch.device("cpu"), seed=3)["input_ids"]
    return cfg, m, ids


def test_chunked_ce_in_model_matches_hf_loss(plain_and_ids):
    cfg, m, ids = plain_and_ids
    r32 = PLAIN.replace(param_dtype="float32")
    labels = ids.clone()
    labels[:, :5] = -100
    l_hf, g_hf = step(m, r32, ids, labels)
    l_ch, g_ch = step(m, r32.replace(cross_entropy="chunked", ce_chunk_tokens=37), ids, labels)
    assert l_ch == pytest.approx(l_hf, rel=1e-5)
    assert_grads_close(g_ch, g_hf, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode,layers", [("full", None), ("full", 1), ("selective", None), ("offload", None)])
def test_checkpoint_variants_keep_grads(plain_and_ids, mode, layers):
    cfg, m0, ids = plain_and_ids
    r32 = PLAIN.replace(param_dtype="float32")
    l_ref, g_ref = step(m0, r32, ids)
    m = copy.deepcopy(m0)
    info = fast.configure_layers(m, compile=False, checkpointing=mode, checkpoint_layers=layers)
    assert info["checkpointed_layers"] == (cfg.num_hidden_layers if layers is None else layers)
    l, g = step(m, r32, ids)
    assert l == pytest.approx(l_ref, rel=1e-6)
    assert_grads_close(g, g_ref, rtol=1e-5)
    fast.configure_layers(m, compile=False)  # back to plain
    assert all(layer._compiled_call_impl is None for layer in fast.decoder_layers(m))


def test_recipe_checkpoint_layers_uses_wrapper():
    m = build_lora_model(tiny(), PLAIN.replace(param_dtype="float32", gradient_checkpointing="full",
                                               checkpoint_layers=1), "cpu")
    assert "full on 1 layers" in m.loralab_levers["checkpointing"]
    assert not any(getattr(x, "gradient_checkpointing", False) for x in m.modules())  # not HF's reentrant path


def test_lora_in_input_dtype_bf16():
    """bf16 model: LoRA matmuls in bf16 with fp32 weights give the loss and grads of peft's fp32 path."""
    cfg = tiny()
    m = build_lora_model(cfg, PLAIN, "cpu", seed=0)
    nonzero_b(m)
    ids = random_batch(cfg.vocab_size, 2, 64, torch.device("cpu"), seed=4)["input_ids"]
    l_ref, g_ref = step(m, PLAIN, ids)
    assert fast.lora_in_input_dtype(m) == 2 * cfg.num_hidden_layers
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if p.requires_grad)
    l, g = step(m, PLAIN, ids)
    assert l == pytest.approx(l_ref, rel=1e-2)
    assert_grads_close(g, g_ref, rtol=5e-2, atol=5e-3)


def test_fast_recipe_levers_on_cpu():
    m = build_lora_model(tiny(), get_recipe("fast"), "cpu")
    lv = m.loralab_levers
    assert lv["liger"] == "off: " + fast.LIGER_UNAVAILABLE or lv["liger"].startswith("on")
    assert lv["compile"].startswith("off (CPU")
    assert lv["cross_entropy"].startswith("chunked")
    assert lv["lora_dropout"].startswith("0.0")
    assert lv["lora_matmul_dtype"].startswith("input")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_liger_unavailable_on_cpu():
    ok, why = fast.liger_status()
    assert not ok and why == fast.LIGER_UNAVAILABLE
    with pytest.raises(ConfigError, match="liger"):
        build_lora_model(tiny(), PLAIN.replace(liger="on"), "cpu")
    with pytest.raises(ConfigError, match="cross_entropy='liger'"):
        build_lora_model(tiny(), PLAIN.replace(cross_entropy="liger"), "cpu")


def test_recipe_validation():
    with pytest.raises(ConfigError, match="cross_entropy"):
        PLAIN.replace(cross_entropy="fused")
    with pytest.raises(ConfigError, match="compile"):
        PLAIN.replace(compile="yes")
    with pytest.raises(ConfigError, match="checkpoint_layers"):
        PLAIN.replace(checkpoint_layers=-1)


def test_fast_matches_plain_over_steps():
    """The correctness guard at tiny size: same data and seed, fast vs plain HF+PEFT bf16, per-step loss
    within 1 %, gradient norms non-zero (the GPU run repeats it at 7B shape for 50 steps)."""
    cfg = tiny()
    losses = {}
    norms = {}
    for name, rec in (("plain", PLAIN), ("fast", get_recipe("fast"))):
        m = build_lora_model(cfg, rec, "cpu", seed=0)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name], norms[name] = [], []
        for s in range(9):
            ids = random_batch(cfg.vocab_size, 2, 64, torch.device("cpu"), seed=s % 3)["input_ids"]  # 3 batches, 5 epochs
            loss = forward_backward(step_module(m, rec), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            norms[name].append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in m.parameters() if p.grad is not None]))))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
    for a, b in zip(losses["fast"], losses["plain"]):
        assert abs(a - b) / abs(b) < 0.01
    assert all(n > 0 for n in norms["fast"])
    assert losses["fast"][6] < losses["fast"][0]  # it learns (same batch, two epochs later)


@pytest.mark.slow
def test_compile_on_cpu_matches_eager():
    """torch.compile of the decoder layers (forced on CPU): same loss and grads, one compile for all layers."""
    cfg = tiny(layers=3)
    rec = PLAIN.replace(param_dtype="float32")
    m = build_lora_model(cfg, rec, "cpu", seed=0)
    nonzero_b(m)
    ids = random_batch(cfg.vocab_size, 2, 32, torch.device("cpu"), seed=5)["input_ids"]
    l_ref, g_ref = step(m, rec, ids)
    torch._dynamo.reset()
    fast.configure_layers(m, compile=True)
    l, g = step(m, rec, ids)
    assert l == pytest.approx(l_ref, rel=1e-4)
    assert_grads_close(g, g_ref, rtol=1e-3, atol=1e-5)
    for mode in ("full", "selective"):  # the checkpoint inside the compiled layer
        fast.configure_layers(m, compile=True, checkpointing=mode)
        l2, g2 = step(m, rec, ids)
        assert l2 == pytest.approx(l_ref, rel=1e-4), mode
        assert_grads_close(g2, g_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_selective_checkpointing_under_compile_recomputes_no_matmul():
    """Compiled + checkpointed layers: AOTAutograd's backward graph holds the recompute. Full checkpointing
    recomputes the layer's matmuls there, selective keeps them (its policy saves mm outputs): fewer mm."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def count_backward_mm(mode):
        counts = []

        def fw(gm, _inputs):
            return make_boxed_func(gm.forward)

        def bw(gm, _inputs):
            counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                              and getattr(n.target, "overloadpacket", None) is torch.ops.aten.mm))
            return make_boxed_func(gm.forward)

        cfg = tiny(layers=2)
        rec = PLAIN.replace(param_dtype="float32")
        m = build_lora_model(cfg, rec, "cpu", seed=0)
        torch._dynamo.reset()
        fast.configure_layers(m, compile=True, checkpointing=mode,
                              compile_options={"backend": aot_autograd(fw_compiler=fw, bw_compiler=bw)})
        step(m, rec, random_batch(cfg.vocab_size, 2, 16, torch.device("cpu"), seed=1)["input_ids"])
        assert counts, "no backward graph compiled"
        return counts[0]

    full, selective, none = count_backward_mm("full"), count_backward_mm("selective"), count_backward_mm("none")
    # per layer: 7 frozen linears + 4 LoRA matmuls recomputed under full; their backward mms are in all three
    assert selective == none < full, (none, selective, full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_on_gpu_levers_on():
    m = build_lora_model(tiny(), get_recipe("fast"), "cuda")
    assert m.loralab_levers["compile"].startswith("on")


def test_sdpa_order_reports_the_priority_in_force():
    order = fast.sdpa_order()
    assert set(order.split(" > ")) >= {"flash", "efficient", "math", "cudnn"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], set_priority=True):
        assert fast.sdpa_order().startswith("cudnn > math")
    assert fast.sdpa_order() == order


def test_attention_kernels_benchmark_smoke(tmp_path):
    """benchmarks/attention_kernels.py: FLOP count pinned, both layouts measured, against the reference backend."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ak", Path(__file__).parents[1] / "benchmarks" / "attention_kernels.py")
    ak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ak)
    # causal: half of 4 b nh S^2 d forward, x 3.5 with the backward
    assert ak.attention_flops(1, 32, 2048, 128) == 4 * 32 * 2048**2 * 128 / 2 * 3.5 == 120_259_084_288
    assert ak.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention_kernels.json").read_text())["rows"]
    assert {r["layout"] for r in rows} == {"bhsd", "bshd"} and all(r["status"] == "ok" for r in rows)
    assert all(r["speedup_vs_math"] == 1.0 for r in rows)
