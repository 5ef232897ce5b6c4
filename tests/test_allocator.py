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
