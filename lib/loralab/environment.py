"""What machine a measurement ran on: GPU name, driver and memory, for benchmark records."""

from __future__ import annotations

import platform
import subprocess

import torch


def gpu_info() -> dict:
    """{"name", "driver", "memory_gib"} of GPU 0, or the CPU's name when there is no GPU."""
    if not torch.cuda.is_available():
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "driver": None}
    drv = None
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - no nvidia-smi: the driver is simply unknown
        pass
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "driver": drv, "memory_gib": p.total_memory / 2**30}
