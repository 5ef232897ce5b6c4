"""What each stage of a run measured, as typed results: one dataclass per notebook's work.

Each result is written once, whole or not at all (``loralab.files``), as one JSON file named by its class
(``FILE``) in the folder it is given; ``RunFolder`` (``loralab.run_folder``) decides which folder. ``load``
returns None where the file is absent, and ignores fields it does not know (a result written by an older
loralab still loads).

* ``SetupResult``: the machine, versions and the model (notebook 00).
* ``DataResult``: the data, the prompt, token lengths, packing, steps per epoch (notebook 01).
* ``TrainResult``: one training run at one batch size (notebook 03; ``loralab.train`` writes it).
* ``ProfileResult``: FLOPs and MACs three ways, step time, TFLOP/s, MFU, device use (notebook 04).
* ``EvaluationResult``: base vs fine-tuned summaries, ROUGE, generation speed, and the adapter's reload,
  merge and export checks (``AdapterChecks``) (notebook 05).
* ``AutoBatchResult``: what ``--batch-sizes auto`` chose, and what it tried.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from loralab import study
from loralab.files import write_json_atomic

RESULT_FILE = "train_result.json"


class Result:
    """save / load / to_dict shared by every result: one JSON file ``FILE`` in a folder."""

    FILE: ClassVar[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, folder: Path) -> Path:
        """Write ``FILE`` in ``folder`` atomically (no half-written result ever looks complete)."""
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: Path):
        """The result saved in ``folder``, or None when there is none."""
        path = Path(folder) / cls.FILE
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class SetupResult(Result):
    """The machine and the model the run uses (notebook 00)."""

    FILE: ClassVar[str] = "setup.json"
    environment: dict[str, Any] = field(default_factory=dict)
    """Python, CUDA and package versions; the GPU (name, driver, memory) or the CPU (name, threads); the memory cap."""
    model_folder: str | None = None
    """The model's Hugging Face folder (a preset built, a Meta checkpoint converted); None: built in memory."""
    random_weights: bool = False
    parameters: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    """The model's source and shape, as shown: layers, hidden, heads, vocab, parameters."""


@dataclass
class DataResult(Result):
    """The data as the run trains on it (notebook 01)."""

    FILE: ClassVar[str] = "data.json"
    source: str = ""
    tokenizer: str = ""
    seq_len: int = 0
    packing: bool = False
    dialogues: list[dict] = field(default_factory=list)
    """Per split: {"split", "dialogues", "empty dialogues"}."""
    examples: list[dict] = field(default_factory=list)
    """The first train dialogues (dialogue, summary)."""
    prompt_template: str = ""
    example_prompt: str = ""
    example_ids: list[int] = field(default_factory=list)
    eos_id: int | None = None
    train_lengths: list[int] = field(default_factory=list)
    """Tokens per train prompt (BOS and EOS included)."""
    splits: list[dict] = field(default_factory=list)
    """Per split: prompts, tokens, mean tokens per prompt, chunks (or rows), tokens dropped; the study's chunks."""
    train_chunks: int = 0
    val_chunks: int = 0
    test_chunks: int = 0
    train_tokens: int = 0
    steps_per_epoch: dict[int, int] = field(default_factory=dict)
    matches_study: bool = False
    """Packed at 2048 with the study's token count: the study's chunk and step counts are shown beside."""

    @classmethod
    def from_dict(cls, d: dict):
        r = super().from_dict(d)
        r.steps_per_epoch = {int(k): v for k, v in r.steps_per_epoch.items()}  # JSON keys are text
        return r

    def study_steps_per_epoch(self, batch_size: int) -> int | None:
        """The study's steps per epoch at this batch size, where this data is the study's set-up."""
        return study.STEPS_PER_EPOCH.get(batch_size) if self.matches_study else None


@dataclass
class TrainResult(Result):
    """What one training run (one batch size) did: written once, by ``TrainResult.save``, read by the run
    folder's owner and notebooks 03, 04 and 06."""

    FILE: ClassVar[str] = RESULT_FILE
    status: str
    """"ok", "oom" (out of memory: a result), "diverged", "interrupted" or "error" (the run did not finish)."""
    batch_size: int
    """Per-process (per-GPU) batch size."""
    steps_per_epoch: int = 0
    steps_done: int = 0
    total_steps: int = 0
    tokens_per_step: float = 0.0
    """Tokens a step trains on, all processes together, padding excluded (the mean over the steady steps)."""
    final_loss: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    epoch_time_s: float | None = None
    epoch_time_kind: str | None = None
    """"measured" (a whole epoch ran) or "extrapolated from N steps"."""
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_active_gib: float | None = None
    peak_device_used_gib: float | None = None
    """Device memory in use as nvidia-smi shows it (CUDA context and other processes included); the largest GPU."""
    error: str | None = None
    oom_memory: dict | None = None
    adapter_dir: str | None = None
    losses: list[float] = field(default_factory=list)
    # several processes (world_size 1: one process)
    world_size: int = 1
    strategy: str = "single process"
    grad_accum: int = 1
    global_batch_size: int | None = None
    tokens_per_s_per_gpu: float | None = None
    per_rank: list[dict] = field(default_factory=list)
    """Each rank's peaks over the run."""
    rank_status: list[str] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    """Each checkpoint written: {"step", "seconds"} (what resuming costs to make possible)."""
    resumed_from_step: int | None = None
    # known before training
    predicted_peak_gib: float | None = None
    """The memory model's predicted peak reserved memory (per GPU)."""
    predicted_device_gib: float | None = None
    """The same prediction as device memory in use (CUDA context included)."""
    random_weights: bool | None = None
    trainable_params: int | None = None


@dataclass
class ProfileResult(Result):
    """FLOPs, MACs, step time, TFLOP/s, MFU and device use of one training step at one batch size (notebook 04)."""

    FILE: ClassVar[str] = "profile.json"
    model: str = ""
    recipe: str = ""
    batch_size: int = 0
    seq_len: int = 0
    """The sequence length FLOPs are counted at (a run of single dialogues: their mean length)."""
    seq_len_note: str = ""
    device: str = ""
    analytic: dict[str, Any] = field(default_factory=dict)
    """``flops.recipe_step_flops(...).as_dict()``: each term, model and hardware FLOPs, MACs."""
    causal_model_flops: float = 0.0
    """Model FLOPs with attention counted causally (FlashAttention's convention), for comparison."""
    flop_counter: dict[str, Any] = field(default_factory=dict)
    """torch FlopCounterMode over one real step: total and convention."""
    flop_counter_by_op: dict[str, float] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    quantization: str = "none"
    step_time_s: float = 0.0
    step_time_source: str = ""
    peak_measured_tflops: float = 0.0
    peak_sheet_tflops: float | None = None
    peak_tflops: float | None = None
    flops_per_step: float = 0.0
    macs_per_step: float = 0.0
    hardware_flops_per_step: float = 0.0
    tflops_per_s: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    gpu_sampled: bool = False
    """True when nvitop sampled a GPU; False: the host (CPU %, memory) was sampled instead."""
    monitor: dict[str, Any] = field(default_factory=dict)
    """The monitor's summary: samples, mean GPU use, peak device memory, mean power."""
    monitor_samples: list[dict] = field(default_factory=list)
    per_batch_size: list[dict] = field(default_factory=list)
    """Analytic model / hardware TFLOPs, TMACs and DeepSpeed-convention TFLOPs for batch sizes 1, 2, 4, 7, 8."""
    linear_fit: dict[str, float] = field(default_factory=dict)
    """Model TFLOPs per step against batch size: slope, intercept, r2."""
    study_epoch_steps: int | None = None
    """Steps of the study's SAMSum epoch at this batch size (packed at 2048), when they apply."""


@dataclass
class AdapterChecks(Result):
    """The adapter after training: reloaded, merged into the base weights, exported as a plain HF model."""

    FILE: ClassVar[str] = "adapter_checks.json"
    dtype: str = "float32"
    reload_max_logit_diff: float = 0.0
    reload_same_summaries: bool = False
    merge_max_logit_diff: float = 0.0
    merge_top1_agreement_pct: float = 0.0
    merge_tolerance: float | None = None
    """fp32: 1e-5 of the largest logit, at least 1e-5; None in bf16 (rounding of the merged weights shows)."""
    tolerance_note: str = ""
    exported_folder: str = ""
    exported_files: list[str] = field(default_factory=list)
    exported_size_gib: float = 0.0
    passed: bool | None = None
    """fp32: reload identical and merge within the tolerance; None where no pass/fail applies (bf16)."""

    def failures(self) -> list[str]:
        """Why the checks failed (empty when they passed or do not apply)."""
        if self.passed is not False:
            return []
        out = []
        if self.reload_max_logit_diff != 0.0 or not self.reload_same_summaries:
            out.append("reloaded adapter does not reproduce the trained model")
        if self.merge_tolerance is not None and self.merge_max_logit_diff > self.merge_tolerance:
            out.append(f"merged logits differ by {self.merge_max_logit_diff:.2e} (> {self.merge_tolerance:.1e})")
        return out


@dataclass
class EvaluationResult(Result):
    """Base vs fine-tuned summaries on test dialogues, ROUGE, generation speed, adapter checks (notebook 05).

    The ROUGE fields are ``evaluate.eval_summary_dict``'s (F1 fractions 0..1, 95 % bootstrap intervals)."""

    FILE: ClassVar[str] = "eval.json"
    n: int = 0
    rouge_base: dict[str, float] = field(default_factory=dict)
    rouge_finetuned: dict[str, float] | None = None
    ci95_base: dict[str, dict] = field(default_factory=dict)
    ci95_finetuned: dict[str, dict] | None = None
    diff_finetuned_minus_base: dict[str, dict] | None = None
    convention: str = ""
    model_folder: str = ""
    dtype: str = ""
    device: str = ""
    parameters: int = 0
    tokenizer: str = ""
    test_dialogues: int = 0
    position_limit: int = 0
    max_new_tokens: int = 0
    adapter_dir: str = ""
    decoding: dict[str, Any] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    """The first dialogues shown side by side: dialogue, reference, base, fine-tuned, and their ROUGE-L."""
    generation: dict[str, dict] = field(default_factory=dict)
    """Per model: generated tokens, seconds, tok/s, peak memory and how it was measured, batch size."""
    random_weights: bool = False
    adapter_life: AdapterChecks | None = None
    adapter_life_skipped: str = ""
    """Why the adapter checks did not run ("" when they ran)."""

    @classmethod
    def from_dict(cls, d: dict):
        r = super().from_dict(d)
        if isinstance(r.adapter_life, dict):
            r.adapter_life = AdapterChecks.from_dict(r.adapter_life)
        return r


@dataclass
class AutoBatchResult(Result):
    """What ``--batch-sizes auto`` chose (``loralab.autobatch.choose``), or why it could not."""

    FILE: ClassVar[str] = "autobatch.json"
    chosen: int = 0
    predicted_gib: float = 0.0
    measured_gib: float = 0.0
    headroom_gib: float = 0.0
    capacity_gib: float = 0.0
    capacity_kind: str = ""
    step: str = ""
    tried: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def line(self) -> str:
        return (f"chose {self.chosen} (predicted {self.predicted_gib:.2f} GiB, measured {self.measured_gib:.2f} GiB, "
                f"headroom {self.headroom_gib:.2f} GiB of {self.capacity_gib:.1f} GiB, {self.capacity_kind}); "
                f"tried {[t['batch_size'] for t in self.tried]}")


@dataclass
class ScalingResult(Result):
    """This run against ``--scaling-reference`` (a run on fewer GPUs): tokens/s per batch size, speed-up, efficiency."""

    FILE: ClassVar[str] = "scaling.json"
    reference: str = ""
    rows: list[dict] = field(default_factory=list)
