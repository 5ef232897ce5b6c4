"""loralab's training: one loop for one process or many, one step, one typed result.

``run_training(cfg, out_dir)`` is what notebook 03 calls: one process trains in this process
(world size 1); several (``cfg.nproc * cfg.nnodes > 1``) train under torchrun
(``loralab.distributed.launch``), where every rank runs ``train_on_rank``, the function the single
process runs too. ``train`` is the loop; ``training_step`` the step (forward, the recipe's loss,
backward, optimizer step) that training, ``--batch-sizes auto``, the profilers and the benchmarks
all call; ``forward_backward`` the one place ``.backward()`` runs.

Phases: setup (optimizer, scheduler, seed), train (steps), finish (adapter, result). Per step, rank 0
writes one JSON line to ``steps.jsonl``: step, epoch, loss, lr, tokens, tokens/s, step time, and the
peak memory of that step on every rank (allocated, reserved, active; the allocator's peaks are reset
before each step) plus the device memory in use as a monitor shows it (CUDA context included).

As llama-recipes (2023): AdamW(lr, weight_decay), StepLR(step_size=1, gamma) stepped once per epoch,
sequential batches with drop_last, no autocast unless the recipe asks, loss over every token.

Out-of-memory is a result: the run ends with status "oom", the step and the memory at the failure,
and memory is given back so the sweep can go on. A non-finite loss is a bug, not a result: it raises.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from loralab import distributed as D
from loralab.config import ConfigError, RunConfig
from loralab.device import GIB, MemoryMeter, free_memory, is_oom, sync
from loralab.fast import IGNORE_INDEX
from loralab.lifecycle import SignalHandlers
from loralab.results import TrainResult


# --- the step ------------------------------------------------------------------------------------
def forward_backward(model, batch: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Forward, the recipe's loss, backward. ``model``: ``distributed.wrap_model``'s module (``loss = model(batch)``).
    Returns the loss, detached. The logits never outlive the forward (freed inside the loss)."""
    loss = model(batch)
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.detach()


def training_step(model, micro_batches: list[dict[str, torch.Tensor]], optimizer, ctx: D.DistContext) -> tuple[float, int]:
    """One optimizer step over ``micro_batches`` (gradient accumulation): (this rank's share of the step's loss,
    tokens this rank trained on).

    The step's loss is the mean over every target token of every micro-batch of every rank, as one process
    with the whole global batch computes it: each micro-batch's mean loss is weighted by its share of the
    step's target tokens (counted across ranks first: one small all-reduce), so padded rows of different
    lengths weigh what their tokens weigh, and DDP's and FSDP's gradient averaging over ranks is undone by
    the world size. With packed rows every share is equal (1 / accumulation steps). DDP all-reduces on the
    last micro-batch only (with static_graph, i.e. reentrant checkpointing, DDP cannot skip a sync: it
    all-reduces every micro-batch, the same sum at a small cost for LoRA gradients); FSDP reduce-scatters on
    the last one only. The rank shares of the returned loss sum to the step's loss."""
    batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in micro_batches]
    targets = [int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches]
    all_targets = D.all_reduce_sum(ctx, sum(targets))
    loss_share = torch.zeros((), device=ctx.device)
    for i, (batch, n) in enumerate(zip(batches, targets)):
        weight = n / all_targets
        last = i == len(batches) - 1
        no_sync = ctx.enabled and ctx.strategy == "ddp" and not last and not getattr(model, "static_graph", False)
        if ctx.enabled and ctx.strategy == "fsdp":
            model.set_requires_gradient_sync(last)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss_share += weight * forward_backward(model, batch, scale=weight * ctx.world_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_share), sum(int(b["attention_mask"].sum()) for b in batches)


def optimizer_setup(model, cfg: RunConfig):
    """(AdamW over the trainable parameters, StepLR stepped once per epoch), seeded: as llama-recipes (2023)."""
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.recipe.learning_rate, weight_decay=cfg.recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.recipe.lr_gamma)
    return opt, sched


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _nan(v):
    return math.nan if v is None else float(v)


def _none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


# --- the loop ------------------------------------------------------------------------------------
class StopRequest(SignalHandlers):
    """SIGINT / SIGTERM during training ask the loop to stop at the end of the current step (checkpoint first);
    a second signal stops at once. Installed only in the main thread (where Python delivers signals)."""

    def __init__(self):
        super().__init__()
        self.signal: int | None = None

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal is not None:  # asked twice: stop now
            signal.signal(signum, self._saved.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal = signum


def _truncate_steps(path: Path, step: int) -> None:
    """Keep the step log's lines up to ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


def train(cfg: RunConfig, model, train_split, out_dir: Path, pad_id: int, ctx: D.DistContext | None = None,
          progress=print, known: dict | None = None, inject_oom: tuple[set[int], int] | None = None) -> TrainResult:
    """Train ``model`` (``distributed.wrap_model``'s module around a PeftModel) on ``train_split``.

    Every rank runs this; rank 0 writes ``steps.jsonl``, the adapter and ``train_result.json`` to
    ``out_dir``. ``known``: fields of the result known before training (the memory model's prediction).
    ``inject_oom = (ranks, step)`` raises a fake out-of-memory error on those ranks at that step (tests:
    a real CUDA out-of-memory error cannot happen on a CPU).

    Global step g covers training rows [g*G, (g+1)*G) in order (G = batch x world size x accumulation);
    after every step the ranks exchange one small vector (ok flag, loss, step time, tokens, stop request,
    peak memory) over a gloo control group with its own timeout, so an out-of-memory error or a stop
    request on any rank stops every rank at the same step (``loralab.distributed``).

    Checkpoints (``loralab.checkpoint``) every ``cfg.checkpoint_every_min`` minutes of training and at the
    end; with ``cfg.resume`` the run continues from the newest one in ``out_dir``: the same data position,
    optimizer, scheduler and RNG states, so the losses continue as if never interrupted. SIGINT / SIGTERM:
    the current step finishes, a checkpoint is written, the result says "interrupted", KeyboardInterrupt is
    raised. A non-finite loss stops the run at that step: status "diverged", the last finite checkpoint kept.
    """
    from loralab import checkpoint
    from loralab.progress import Progress

    ctx = ctx or D.DistContext(device=next(model.parameters()).device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, b, W, A = ctx.device, cfg.batch_size, ctx.world_size, ctx.grad_accum
    G = D.global_batch_size(b, W, A)
    spe = D.steps_per_epoch(len(train_split.rows), b, W, A)
    if spe == 0:
        raise ConfigError(f"batch_size={b}: global batch {G} (batch {b} x {W} process(es) x {A} accumulation) is larger "
                          f"than the {len(train_split.rows)} training rows; expected at most {len(train_split.rows)}")
    total = spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
    result = TrainResult(status="ok", batch_size=b, steps_per_epoch=spe, total_steps=total,
                         tokens_per_step=G * train_split.seq_len, world_size=W, grad_accum=A, global_batch_size=G,
                         strategy=ctx.strategy if ctx.enabled else "single process", **(known or {}))

    # --- setup
    opt, sched = optimizer_setup(model, cfg)
    meter = MemoryMeter(device)
    model.train()
    times: list[float] = []
    step_tokens: list[int] = []
    rank_peaks: list[dict] = [{} for _ in range(W)]
    step, epoch, oom_ranks, error = 0, 0, [], None
    since_ckpt = 0.0  # seconds of training since the last checkpoint (the same on every rank: from the exchange)
    resumed = checkpoint.latest(out_dir) if cfg.resume else None
    if resumed is not None:
        loop = checkpoint.load(resumed, model, opt, sched, ctx)
        step, epoch = loop["step"], loop["epoch"]
        times, step_tokens, rank_peaks, result.losses = loop["times"], loop["step_tokens"], loop["rank_peaks"], loop["losses"]
        result.checkpoints, result.resumed_from_step = loop["checkpoints"], step
        if ctx.is_main:
            _truncate_steps(out_dir / "steps.jsonl", step)
            progress(f"resuming from {resumed} (step {step} of {total})")
    last_checkpoint = step
    log = (out_dir / "steps.jsonl").open("a" if resumed else "w") if ctx.is_main else None
    if ctx.is_main:
        progress(f"training: batch {b}" + (f" per GPU x {W} GPUs x {A} accumulation = global batch {G}" if G != b else "")
                 + f", {total} steps ({spe} per epoch), device {device}" + (f", {ctx.strategy}" if ctx.enabled else ""))

    def save_checkpoint() -> None:
        nonlocal last_checkpoint, since_ckpt
        t0 = time.perf_counter()
        checkpoint.save(out_dir, model, opt, sched, ctx, {
            "step": step, "epoch": epoch, "times": times, "step_tokens": step_tokens, "rank_peaks": rank_peaks,
            "losses": result.losses, "checkpoints": result.checkpoints})
        result.checkpoints.append({"step": step, "seconds": time.perf_counter() - t0})
        last_checkpoint, since_ckpt = step, 0.0

    bar = Progress(total, f"training bs {b}", initial=step) if ctx.is_main else None
    D.barrier(ctx)  # ranks start the first step together (model loading takes different times)
    t_start = time.perf_counter()
    stop = StopRequest()
    try:
        with stop:
            while step < total and result.status == "ok":
                # one epoch; a resumed run starts where its checkpoint was, inside its epoch
                for micro in D.rank_batches(train_split, b, pad_id, ctx.rank, W, A, start=step - epoch * spe):
                    ok, loss_v, n_tokens = 1.0, math.nan, 0
                    meter.reset()
                    sync(device)
                    t0 = time.perf_counter()
                    try:
                        if inject_oom and ctx.rank in inject_oom[0] and step + 1 == inject_oom[1]:
                            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
                        loss_v, n_tokens = training_step(model, micro, opt, ctx)
                        sync(device)
                    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a result
                        if not is_oom(exc):
                            raise
                        ok, error = 0.0, _short(exc)
                        opt.zero_grad(set_to_none=True)
                        free_memory(device)
                        if ctx.enabled:
                            D.write_rank_record(out_dir, ctx, {"status": "oom", "at_step": step + 1, "error": error, **meter.now()})
                    dt = time.perf_counter() - t0
                    mem = meter.read()
                    try:
                        rows = D.exchange(ctx, [ok, loss_v, dt, n_tokens, float(stop.signal is not None)]
                                          + [_nan(mem[k]) for k in MemoryMeter.KEYS])
                    except Exception:  # noqa: BLE001 - a peer is stuck in a collective this rank left
                        if ok:
                            raise
                        if log:
                            log.close()
                        progress(f"rank {ctx.rank}: out of memory at step {step + 1}; peers unreachable, exiting")
                        os._exit(D.OOM_EXIT_CODE)  # torchrun's agent stops the other workers
                    oom_ranks = [r for r, row in enumerate(rows) if row[0] == 0]
                    if oom_ranks:
                        result.status = "oom"
                        result.error = error or f"out of memory on rank(s) {oom_ranks}"
                        result.oom_memory = {"at_step": step + 1, **({"ranks": oom_ranks} if ctx.enabled else {}), **meter.now()}
                        if ctx.is_main:
                            progress(f"out of memory at step {step + 1} (batch size {b})"
                                     + (f" on rank(s) {oom_ranks}: every rank stops" if ctx.enabled else f": {result.oom_memory}"))
                        break
                    lv = sum(r[1] for r in rows)  # the ranks' shares of the step's loss
                    if not math.isfinite(lv):
                        result.status = "diverged"
                        result.error = f"loss is {lv} at step {step + 1}; the last finite checkpoint is kept"
                        if ctx.is_main:
                            progress(f"diverged: {result.error}")
                        break
                    step += 1
                    dt_max = max(r[2] for r in rows)
                    tokens = int(sum(r[3] for r in rows))
                    per_rank = [{"rank": r, "loss_share": row[1], "step_time_s": row[2],
                                 **{k: _none(v) for k, v in zip(MemoryMeter.KEYS, row[5:])}} for r, row in enumerate(rows)]
                    for r, pr in enumerate(per_rank):
                        for k in MemoryMeter.KEYS:
                            if pr[k] is not None:
                                rank_peaks[r][k] = max(rank_peaks[r].get(k, 0.0), pr[k])
                    times.append(dt_max)
                    step_tokens.append(tokens)
                    result.losses.append(lv)
                    since_ckpt += dt_max
                    if ctx.is_main:
                        worst = {k: max((pr[k] for pr in per_rank if pr[k] is not None), default=None) for k in MemoryMeter.KEYS}
                        rec = {"step": step, "epoch": epoch, "loss": lv, "lr": opt.param_groups[0]["lr"], "tokens": tokens,
                               "tokens_per_s": tokens / dt_max, "step_time_s": dt_max,
                               "elapsed_s": time.perf_counter() - t_start, **worst}
                        if ctx.enabled:
                            rec.update(tokens_per_s_per_gpu=tokens / dt_max / W, world_size=W, per_gpu_batch_size=b,
                                       grad_accum=A, global_batch_size=G, ranks=per_rank)
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        peak = worst["peak_reserved_gib"]
                        bar.update(1, loss=f"{lv:.4f}", **{"tok/s": f"{tokens / dt_max:,.0f}"},
                                   **({"peak": f"{peak:.2f} GiB"} if peak is not None else {}))
                    requested = any(r[4] for r in rows)
                    if requested or (cfg.checkpoint_every_min and since_ckpt >= 60 * cfg.checkpoint_every_min):
                        save_checkpoint()
                    if requested:
                        result.status = "interrupted"
                        result.error = f"stopped by a signal after step {step}; resume from {checkpoint.latest(out_dir)}"
                    if step >= total or result.status != "ok":
                        break
                else:  # the epoch's batches ran out
                    epoch += 1
                    sched.step()  # StepLR once per epoch, as llama-recipes
                    continue
                break
            if result.status == "ok" and step != last_checkpoint:
                save_checkpoint()  # at the end: a finished run can be continued for more epochs
    finally:
        if log:
            log.close()
        if bar:
            bar.close()

    # --- finish (every rank: the FSDP adapter gather is a collective)
    for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_active_gib"):
        vals = [p[k] for p in rank_peaks if k in p]
        setattr(result, k, max(vals) if vals else None)
    used = [p["device_used_gib"] for p in rank_peaks if "device_used_gib" in p]
    result.peak_device_used_gib = max(used) if used else None
    result.per_rank = [{"rank": r, **{k: p.get(k) for k in MemoryMeter.KEYS}} for r, p in enumerate(rank_peaks)]
    result.rank_status = ["oom" if r in oom_ranks else result.status for r in range(W)]
    result.steps_done = step
    if times:
        k = 2 if len(times) > 4 else 0  # the first steps include warm-up (and torch.compile)
        steady = times[k:]
        result.step_time_s = sum(steady) / len(steady)
        result.tokens_per_step = sum(step_tokens[k:]) / len(steady)
        result.tokens_per_s = sum(step_tokens[k:]) / sum(steady)
        result.tokens_per_s_per_gpu = result.tokens_per_s / W
        result.final_loss = result.losses[-1]
        if step >= spe:
            result.epoch_time_s, result.epoch_time_kind = sum(times[:spe]), "measured"
        else:
            result.epoch_time_s = result.step_time_s * spe
            result.epoch_time_kind = f"extrapolated from {len(steady)} steps"
    if result.status == "ok":
        D.save_adapter(model, ctx, out_dir / "adapter")
        result.adapter_dir = str(out_dir / "adapter")
    if ctx.is_main:
        result.save(out_dir)
    if result.status == "interrupted":
        raise KeyboardInterrupt(result.error)
    return result


# --- one run, start to end -----------------------------------------------------------------------
def predict_memory(cfg: RunConfig, model_config, world_size: int, strategy: str, device: str) -> dict:
    """The memory model's prediction for this run, as TrainResult fields (empty when it does not model the recipe)."""
    try:
        bd = D.predict_peak_distributed(model_config, cfg.recipe, cfg.batch_size, cfg.seq_len, world_size,
                                        strategy if world_size > 1 else "ddp", device=device)
    except ConfigError:
        return {}
    return {"predicted_peak_gib": bd.reserved / GIB, "predicted_device_gib": bd.total / GIB}


def train_on_rank(cfg: RunConfig, out_dir: Path, ctx: D.DistContext, progress=print,
                  inject_oom: tuple[set[int], int] | None = None) -> TrainResult:
    """Load, tokenise, predict, train: what one process does, alone or as one rank under torchrun."""
    from loralab.data import load_splits, tokenize_splits
    from loralab.model import load_for_training
    from loralab.shape import model_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    known = {"random_weights": cfg.random_weights}
    try:
        shard = (lambda m: D.wrap_model(m, ctx, cfg.recipe)) if ctx.strategy == "fsdp" and ctx.enabled else None
        model, tok, info = load_for_training(cfg, progress=progress if ctx.is_main else (lambda *a: None),
                                             device=ctx.device, shard=shard)
        wrapped = model if shard else D.wrap_model(model, ctx, cfg.recipe)
    except Exception as exc:  # noqa: BLE001 - out of memory while loading or sharding is a result too
        if not is_oom(exc):
            raise
        err = _short(exc)
        progress(f"out of memory while loading the model: {err}")
        result = TrainResult(status="oom", batch_size=cfg.batch_size, error=err, world_size=ctx.world_size,
                             oom_memory={"at_step": 0, "phase": "loading the model"}, **known)
        if ctx.enabled:
            D.write_rank_record(out_dir, ctx, {"status": "oom", "at_step": 0, "error": err})
        if ctx.is_main:
            result.save(out_dir)
        return result
    known.update(trainable_params=info["trainable_params"],
                 **predict_memory(cfg, model_config(info["model_folder"] or cfg.model), ctx.world_size, ctx.strategy,
                                  ctx.device.type))
    if ctx.is_main:
        (out_dir / "setup.json").write_text(json.dumps({**info, **known, "strategy": ctx.strategy,
                                                        "world_size": ctx.world_size, "grad_accum": ctx.grad_accum},
                                                       indent=1, default=str))
    split = tokenize_splits(tok, load_splits(cfg.data), cfg.seq_len, cfg.packing)["train"]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return train(cfg, wrapped, split, out_dir, pad, ctx, progress=progress, known=known, inject_oom=inject_oom)


def run_training(cfg: RunConfig, out_dir: Path, progress=None, monitor_interval_s: float = 0.5) -> TrainResult:
    """Train one batch size of a run into ``out_dir``: in this process (one process) or under torchrun
    (several), with a background monitor sampling the GPU (or the host) into ``monitor.csv``."""
    from loralab.gpu_monitor import GpuMonitor
    from loralab.progress import note

    progress = progress or note  # this output, and the runner's console
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with GpuMonitor(interval_s=monitor_interval_s) as monitor:
        if cfg.world_size > 1:
            result = D.launch(cfg, out_dir, progress=progress)
        else:
            result = train_on_rank(cfg, out_dir, D.single_process_context(cfg), progress=progress)
    monitor.dataframe().to_csv(out_dir / "monitor.csv", index=False)
    return result
