"""GPU (and host) use over time, sampled in the background with nvitop.

    with GpuMonitor(interval_s=0.5) as mon:
        train(...)
    df = mon.dataframe()   # t_s, gpu_util_pct, mem_used_gib, power_w, host_cpu_pct, host_mem_gib

nvitop's ``ResourceMetricCollector`` aggregates NVML readings between two
collections; we collect every ``interval_s`` in a daemon thread and keep one
row per interval: GPU utilisation and power as the interval's mean, device
memory used (whole device, all processes, as nvidia-smi shows it) as its max.

GPU utilisation is NVML's "percent of time over the sample period during which
one or more kernels was executing": a GPU running one tiny kernel at a time
reads 100 %. It is not efficiency; MFU (``loralab.flops``) is.

Without NVML (no NVIDIA driver, as on CI) the monitor samples host metrics only,
says so once in the log, and the GPU columns are NaN.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_said_no_nvml = False  # log "no NVML" once per process, not once per monitor

COLUMNS = ("t_s", "gpu_util_pct", "mem_used_gib", "power_w", "host_cpu_pct", "host_mem_gib")


def _nvml_devices(index: int) -> list:
    """The nvitop Device for CUDA index ``index``, or [] when NVML or nvitop is missing (quietly)."""
    try:
        from nvitop import Device
    except Exception:
        return []
    # nvitop logs a multi-line "FATAL ERROR: NVML not found" when there is no driver: mute it
    quiet = [logging.getLogger(n) for n in ("nvitop", "nvitop.api", "nvitop.api.libnvml")]
    old = [q.disabled for q in quiet]
    for q in quiet:
        q.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            devices = Device.cuda.all()  # honours CUDA_VISIBLE_DEVICES
    except Exception:
        return []
    finally:
        for q, o in zip(quiet, old):
            q.disabled = o
    return devices[index:index + 1]


class GpuMonitor:
    """Background sampler; a context manager, or ``start()`` / ``stop()``.

    interval_s: seconds between rows (nvitop samples faster inside each interval).
    device_index: which visible CUDA device to report (0: cuda:0).
    """

    def __init__(self, interval_s: float = 0.5, device_index: int = 0) -> None:
        if interval_s <= 0:
            from loralab.config import ConfigError

            raise ConfigError(f"interval_s={interval_s}: expected a number of seconds > 0")
        self.interval_s = float(interval_s)
        self.device_index = device_index
        self.rows: list[dict[str, float]] = []
        self.gpu = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = 0.0
        self._gpu_prefix = ""

    # -- lifecycle
    def start(self) -> "GpuMonitor":
        global _said_no_nvml
        self._stop.clear()
        self.rows = []
        self._t0 = time.perf_counter()
        try:
            from nvitop import ResourceMetricCollector
        except ImportError:  # nvitop not installed: host metrics from psutil in our own thread
            self.gpu = False
            if not _said_no_nvml:
                _said_no_nvml = True
                log.info("GpuMonitor: nvitop not installed, sampling host CPU and memory only")
            self._thread = threading.Thread(target=self._psutil_loop, name="gpu-monitor", daemon=True)
            self._thread.start()
            return self
        devices = _nvml_devices(self.device_index)
        self.gpu = bool(devices)
        if not self.gpu:
            if not _said_no_nvml:
                _said_no_nvml = True
                log.info("GpuMonitor: NVML not available, sampling host CPU and memory only")
        else:
            d = devices[0]
            self._gpu_prefix = f"cuda:{d.cuda_index} (gpu:{d.physical_index})/"
        collector = ResourceMetricCollector(devices=devices, root_pids=set(), interval=min(self.interval_s / 4, 0.25))
        self._thread = collector.daemonize(self._on_collect, interval=self.interval_s, tag="m", start=True)
        return self

    def _psutil_loop(self) -> None:
        import psutil

        psutil.cpu_percent(None)
        while not self._stop.wait(self.interval_s):
            self._on_collect({"m/host/cpu_percent (%)/mean": psutil.cpu_percent(None),
                              "m/host/memory_used (GiB)/mean": psutil.virtual_memory().used / 2**30})

    def stop(self) -> "GpuMonitor":
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_s * 4 + 1.0)
            self._thread = None
        return self

    def __enter__(self) -> "GpuMonitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- sampling
    def _on_collect(self, m: dict[str, float]) -> bool:
        nan = float("nan")

        def gpu(metric: str) -> float:
            if not self.gpu:
                return nan
            v = m.get(f"m/{self._gpu_prefix}{metric}")
            if v is None:  # key layout differs between nvitop versions: match on the suffix
                v = next((x for k, x in m.items() if k.startswith("m/cuda:") and k.endswith(metric)), nan)
            return float(v)

        row = {
            "t_s": time.perf_counter() - self._t0,
            "gpu_util_pct": gpu("gpu_utilization (%)/mean"),
            "mem_used_gib": gpu("memory_used (MiB)/max") / 1024,
            "power_w": gpu("power_usage (W)/mean"),
            "host_cpu_pct": m.get("m/host/cpu_percent (%)/mean", nan),
            "host_mem_gib": m.get("m/host/memory_used (GiB)/mean", nan),
        }
        self.rows.append(row)
        return not self._stop.is_set()  # False ends nvitop's daemon thread

    def dataframe(self):
        """The samples so far as a pandas DataFrame with columns ``COLUMNS`` (units in the names)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def summary(self) -> dict[str, float]:
        """Mean GPU utilisation (%), peak device memory (GiB), mean power (W), samples."""
        df = self.dataframe()
        return {
            "gpu_util_pct_mean": float(df["gpu_util_pct"].mean()) if len(df) else float("nan"),
            "mem_used_gib_max": float(df["mem_used_gib"].max()) if len(df) else float("nan"),
            "power_w_mean": float(df["power_w"].mean()) if len(df) else float("nan"),
            "samples": len(df),
        }
