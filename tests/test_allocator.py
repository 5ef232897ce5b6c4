"""loralab.allocator: the recipe's segment mode reaches PyTorch's allocator settings, and only on CUDA."""

import torch

from loralab import allocator
from loralab.config import get_recipe


def test_cpu_is_a_no_op(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_setter", lambda: calls.append)
    assert allocator.configure(get_recipe("fast"), "cpu").startswith("expandable (no CUDA")
    assert calls == []


def test_cuda_sets_expandable_segments_per_recipe(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(allocator, "_setter", lambda: calls.append)
    assert allocator.configure(get_recipe("fast"), "cuda") == "expandable (expandable_segments:True)"
    assert allocator.configure(get_recipe("seed"), "cuda") == "caching (expandable_segments:False)"
    assert calls == ["expandable_segments:True", "expandable_segments:False"]


def test_torch_without_a_runtime_setter_is_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(allocator, "_setter", lambda: None)
    assert "cannot set it at run time" in allocator.configure(get_recipe("qlora"), "cuda")


def test_this_torch_has_a_setter():
    """The setter's name moved in torch 2.9 (torch._C._accelerator_setAllocatorSettings); one of the two exists."""
    assert allocator._setter() is not None


def test_fast_levers_report_allocator_and_sdpa_order():
    from loralab import fast

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
