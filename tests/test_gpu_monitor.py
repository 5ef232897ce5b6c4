"""GpuMonitor: background sampling; host-only without NVML, quietly."""

import logging
import time

import pytest

from loralab.config import ConfigError
from loralab.gpu_monitor import COLUMNS, GpuMonitor


def test_samples_over_time_and_stops(capfd):
    with GpuMonitor(interval_s=0.1) as mon:
        time.sleep(0.6)
    n = len(mon.rows)
    df = mon.dataframe()
    assert list(df.columns) == list(COLUMNS)
    assert n >= 3
    assert df["t_s"].is_monotonic_increasing
    assert (df["host_mem_gib"] > 0).all()
    assert df["host_cpu_pct"].between(0, 100 * 64).all()
    if not mon.gpu:
        assert df["gpu_util_pct"].isna().all() and df["mem_used_gib"].isna().all()
    time.sleep(0.3)
    assert len(mon.rows) == n  # the thread is gone
    out, err = capfd.readouterr()
    assert "NVML" not in out + err  # no spam on a machine without a driver
    s = mon.summary()
    assert s["samples"] == n


def test_no_nvml_logged_at_most_once(caplog):
    caplog.set_level(logging.INFO, logger="loralab.gpu_monitor")
    for _ in range(2):
        m = GpuMonitor(interval_s=0.05).start()
        time.sleep(0.1)
        m.stop()
    assert len([r for r in caplog.records if "NVML" in r.getMessage()]) <= 1


def test_stop_twice_and_bad_interval():
    m = GpuMonitor(interval_s=0.05).start()
    m.stop()
    m.stop()
    with pytest.raises(ConfigError):
        GpuMonitor(interval_s=0)


def test_without_nvitop_falls_back_to_psutil(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvitop", None)  # import nvitop -> ImportError
    with GpuMonitor(interval_s=0.05) as mon:
        time.sleep(0.3)
    df = mon.dataframe()
    assert not mon.gpu and len(df) >= 2
    assert (df["host_mem_gib"] > 0).all() and df["gpu_util_pct"].isna().all()
