"""Live-bytes tracker for CPU tests: every storage an op creates, counted until it is freed."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors created inside the mode (what a non-caching allocator would hold)."""

    def __init__(self, exclude=()):
        """``exclude``: tensors made before (parameters, buffers) whose storages views must not count."""
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                k, n = st.data_ptr(), st.nbytes()
                if n == 0 or k in self.live or k in self.skip:
                    continue
                self.live[k] = n
                self.cur += n
                self.peak = max(self.peak, self.cur)
                weakref.finalize(st, self._free, k)
        return out

    def _free(self, k: int) -> None:
        self.cur -= self.live.pop(k, 0)
