"""Value for money: ROUGE-L gained per GPU-hour of training, and per dollar when a price is given.

    gain = ROUGE-L(fine-tuned) - ROUGE-L(base), on the same test dialogues (notebook 05)
    GPU-hours = training wall time (s) x GPUs / 3600
    per GPU-hour = gain / GPU-hours;  per dollar = gain / (GPU-hours x USD per GPU-hour)

Only the training counts (not evaluation or loading): it is what a longer or a cheaper run changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loralab.config import ConfigError


@dataclass(frozen=True)
class Value:
    rouge_l_gain: float
    gpu_hours: float
    rouge_l_per_gpu_hour: float
    usd: float | None = None
    rouge_l_per_usd: float | None = None


def rouge_per_gpu_hour(rouge_l_base: float, rouge_l_tuned: float, train_seconds: float, gpus: int = 1,
                       usd_per_gpu_hour: float | None = None) -> Value:
    """ROUGE-L gained per GPU-hour (and per dollar with ``usd_per_gpu_hour``); ConfigError on impossible input."""
    for name, v in (("rouge_l_base", rouge_l_base), ("rouge_l_tuned", rouge_l_tuned)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"{name}={v!r}: expected a ROUGE-L F-measure between 0 and 1")
    if not (train_seconds > 0 and gpus >= 1):
        raise ConfigError(f"train_seconds={train_seconds}, gpus={gpus}: expected seconds > 0 and gpus >= 1")
    if usd_per_gpu_hour is not None and not (math.isfinite(usd_per_gpu_hour) and usd_per_gpu_hour > 0):
        raise ConfigError(f"usd_per_gpu_hour={usd_per_gpu_hour!r}: expected a price > 0")
    gain = rouge_l_tuned - rouge_l_base
    hours = train_seconds * gpus / 3600.0
    usd = hours * usd_per_gpu_hour if usd_per_gpu_hour is not None else None
    return Value(rouge_l_gain=gain, gpu_hours=hours, rouge_l_per_gpu_hour=gain / hours, usd=usd,
                 rouge_l_per_usd=gain / usd if usd else None)
