"""The CUDA caching allocator's segment mode, per recipe (``Recipe.allocator``).

PyTorch's default caching allocator reserves whole segments with cudaMalloc, splits them and
keeps them cached. A training step frees and reallocates blocks of many sizes; a free block
that is too small or on the wrong side of a live one stays reserved and unused. On the H200
sweeps (benchmarks/results/memory_sweep_H200_20261130*) that gap grew to 10-25 % of the peak
for the checkpointed recipes and was not the same from one run to the next (seed-sdpa, batch 16:
49.10, 50.64 and 50.44 GiB reserved for the same 39.64 GiB allocated).

``expandable_segments:True`` (PyTorch >= 2.1; see torch.cuda memory management docs) maps
physical pages into one growing virtual range per stream instead, so freed space is reused
whatever its neighbours, and reserved memory follows allocated memory. loralab's own recipes
use it; ``seed`` keeps the default, because it reproduces the study's runs (llama-recipes,
2023) including which batch sizes ran out of memory.

``configure(recipe)`` sets the mode for allocations made from now on (it is called before the
model's weights reach the GPU). It changes only the ``expandable_segments`` key; anything else
in PYTORCH_CUDA_ALLOC_CONF stays as the user set it.
"""

from __future__ import annotations

import os
import warnings

import torch

SETTING = {"caching": "expandable_segments:False", "expandable": "expandable_segments:True"}


def _setter():
    """PyTorch's runtime setter for allocator settings (its name moved in torch 2.9), or None."""
    fn = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if fn is None:
        fn = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    return fn


def configure(recipe, device: torch.device | str | None = None) -> str:
    """Put the CUDA allocator in the recipe's segment mode; returns what was done, for the reports.

    On CPU (or without CUDA) this is a no-op. Blocks cached under the other mode are released
    first, so the new mode governs every segment made after this call.
    """
    mode = recipe.allocator
    dev_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type != "cuda" or not torch.cuda.is_available():
        return f"{mode} (no CUDA: nothing to set)"
    fn = _setter()
    if fn is None:
        return f"{mode} requested, but this torch ({torch.__version__}) cannot set it at run time; " \
               f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}"
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.13 deprecates the old name, not the feature
        fn(SETTING[mode])
    return f"{mode} ({SETTING[mode]})"


def segment_modes() -> dict[str, int]:
    """How many of the allocator's current segments are expandable and how many are not (for checks)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    segs = torch.cuda.memory._snapshot().get("segments", [])
    out = {"expandable": 0, "fixed": 0}
    for s in segs:
        out["expandable" if s.get("is_expandable") else "fixed"] += 1
    return out
