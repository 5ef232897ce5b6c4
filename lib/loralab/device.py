"""The device a run measures on: which one, capping its memory, reading peaks, out-of-memory, versions.

One place for what training, ``--batch-sizes auto``, the profilers and every benchmark need of the
device, so they all measure the same way:

* ``resolve_device`` ("auto" | "cpu" | "cuda" -> torch.device; CUDA devices carry their index);
* ``cap_gpu_memory`` (emulate a smaller card: ``torch.cuda.set_per_process_memory_fraction``, which
  caps PyTorch's allocator, not the CUDA context);
* ``MemoryMeter`` (the allocator's peaks, reset before each measured step; None on CPU: a CPU run
  has no device memory to report, and 0 would read as a measurement);
* ``is_oom`` / ``free_memory`` (out-of-memory is a result: recognise it, give the memory back);
* ``gpu_info`` / ``versions`` (what a benchmark record says it ran on).
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import platform
import subprocess

import torch

from loralab.config import ConfigError

GIB = 2**30
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "liger-kernel", "triton",
            "torchao", "deepspeed", "nvitop", "papermill", "jupytext", "plotly", "rouge-score", "sentencepiece")


def resolve_device(device: str) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device; CUDA devices always carry an index (cuda:N)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def cap_gpu_memory(gib: float | None, device: torch.device) -> None:
    """Emulate a card with ``gib`` GiB (None: the whole card). Caps PyTorch's allocator, not the CUDA context."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    frac = 1.0 if gib is None else gib * GIB / total
    if frac > 1:
        raise ConfigError(f"gpu_memory_gib={gib}: larger than this GPU ({total / GIB:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(frac, device.index)


def capacity_gib(gpu_memory_gib: float | None, device: torch.device) -> tuple[float, bool]:
    """(capacity, is_allocator_cap): the --gpu-memory-gib cap, else the whole card."""
    if gpu_memory_gib:
        return float(gpu_memory_gib), True
    return torch.cuda.get_device_properties(device).total_memory / GIB, False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: a step's time must include the GPU's work


def is_oom(exc: BaseException) -> bool:
    """A CUDA (or bitsandbytes) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Give cached memory back after an out-of-memory error (drop references to tensors first)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MemoryMeter:
    """Per-step peaks from the CUDA caching allocator (None on CPU)."""

    KEYS = ("peak_allocated_gib", "peak_reserved_gib", "peak_active_gib", "device_used_gib")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float | None]:
        """The peaks since ``reset`` and the device memory in use now (as nvidia-smi shows it)."""
        if not self.cuda:
            return dict.fromkeys(self.KEYS)
        s = torch.cuda.memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {"peak_allocated_gib": s.get("allocated_bytes.all.peak", 0) / GIB,
                "peak_reserved_gib": s.get("reserved_bytes.all.peak", 0) / GIB,
                "peak_active_gib": s.get("active_bytes.all.peak", 0) / GIB,
                "device_used_gib": (total - free) / GIB}

    def now(self) -> dict[str, float]:
        """Memory at this moment (what an out-of-memory report shows)."""
        if not self.cuda:
            return {}
        return {"allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
                "reserved_gib": torch.cuda.memory_reserved(self.device) / GIB,
                "max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                "max_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}


def gpu_info() -> dict:
    """{"name", "driver", "memory_gib", "compute_capability"} of GPU 0, or the CPU's name when there is no GPU."""
    if not torch.cuda.is_available():
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "driver": None}
    drv = None
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - no nvidia-smi: the driver is simply unknown
        pass
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "driver": drv, "memory_gib": p.total_memory / GIB,
            "compute_capability": f"{p.major}.{p.minor}"}


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python, CUDA and the installed version of each package ("not installed" where absent)."""
    out = {"python": platform.python_version(), "cuda": torch.version.cuda or "none"}
    for p in packages:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "not installed"
    return out
