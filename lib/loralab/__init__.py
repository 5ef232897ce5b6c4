"""loralab: LoRA fine-tuning of Llama-2-7B-class models on one GPU, with reports of what it costs."""

import warnings

from loralab import lifecycle as _lifecycle

# A kernel (or other child) started by run_all.py dies with it, even when the runner is killed with SIGKILL.
_lifecycle.arm_from_env()

# Reports are read by people: keep library chatter that says nothing about the run out of them.
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without widgets
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.* is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing.* is deprecated")

import logging as _logging

# bitsandbytes says at import, on every CPU, that an optional kernels package is missing; it falls back correctly
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
