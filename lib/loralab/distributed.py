"""Several GPUs and nodes on PyTorch's own engine: torchrun, DDP, FSDP2.

One process per GPU, launched by ``torchrun`` (``loralab.train_entry``), or by
``launch()`` here, which ``loralab.train.run_training`` calls when a run has several
processes (``run_all.py --nproc N``). Every rank runs ``loralab.train.train_on_rank``, the
same function one process runs alone, and its one loop (``loralab.train.train``). Each
process reads its rank from torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), joins the process group (NCCL
on CUDA, gloo on CPU) and trains its slice of every global batch.

Strategies (``wrap_model``):
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``: a full replica per GPU,
  the LoRA gradients all-reduced (averaged) in backward. For when a replica fits.
- ``fsdp``: FSDP2 ``torch.distributed.fsdp.fully_shard`` on every decoder layer and
  the root: each GPU keeps 1/N of every parameter (frozen base and LoRA alike) and
  all-gathers a layer's weights just before it runs. Parameters keep their own
  dtypes (bf16 base, fp32 LoRA as peft makes them), so numerics equal one GPU's.
  Gradient checkpointing switches to non-reentrant under FSDP (FSDP2's hooks must
  see the recomputation; torchtitan does the same).
- ``auto``: ``ddp`` when ``predict_peak_distributed(..., "ddp")`` fits the card, else ``fsdp``.

Batches: global batch = per-GPU batch x world size x accumulation steps
(``global_batch_size``). Global step g covers training rows [g*G, (g+1)*G) in order;
micro-step m of rank r takes rows g*G + (m*W + r)*b ... + b. Every packed row has the
same token count, so the mean of the ranks' mean losses is the one-GPU loss of the
whole global batch, and 2 GPUs x batch b == 1 GPU x batch 2b, step for step.
(Unpacked, padded rows weight ranks equally, not tokens: a small difference.)

Metrics and out-of-memory: after every step all ranks exchange one small vector
(ok flag, loss, step time, peak memory) with ``all_gather`` on a separate gloo
control group that has its own timeout. Rank 0 writes one JSON line per step with
every rank's peaks. An OOM on any rank makes the flag 0 on every rank, so all stop
together and exit 0. If the OOM strikes one rank inside a collective (its peers wait
in an NCCL all-reduce it will never join), the control exchange times out on that
rank: it has already written ``rank{r}_result.json`` and exits with ``OOM_EXIT_CODE``;
torchrun then stops the other workers (its agent tears the group down on a worker
failure), and ``launch()`` merges the rank records into ``train_result.json`` (status
"oom"). No collective is left hanging past ``LORALAB_DIST_TIMEOUT_S`` (default 120 s).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from loralab.config import ConfigError, Recipe, RunConfig

GIB = 2**30
STRATEGIES = ("ddp", "fsdp")
OOM_EXIT_CODE = 3
"""Exit status of a rank that ran out of memory alone and could not reach its peers."""


def control_timeout_s() -> float:
    return float(os.environ.get("LORALAB_DIST_TIMEOUT_S", "120"))


# --- process group -------------------------------------------------------------------------
@dataclass
class DistContext:
    """Where this process stands: its rank, its device, the strategy, the accumulation steps."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    grad_accum: int = 1
    control: object = None
    """gloo process group with its own timeout for the per-step exchange (None: single process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init(cfg: RunConfig) -> DistContext:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on CPU; one GPU per local rank; the
    strategy resolved (``resolve_strategy``) before any model exists."""
    import torch.distributed as dist

    rank, local_rank, world = env_world()
    device, grad_accum = cfg.device, cfg.grad_accum
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': no CUDA GPU is visible; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank=rank, local_rank=local_rank, world_size=world, device=dev,
                      strategy=resolve_strategy(cfg, dev), grad_accum=grad_accum)
    if world > 1 or "MASTER_ADDR" in os.environ:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kw)
        ctx.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=control_timeout_s()))
    return ctx


def teardown(ctx: DistContext) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=ctx.control)


# --- models --------------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """``forward(batch) -> loss`` as the recipe computes it (``loralab.fast.forward_loss``).

    The fast recipe's chunked cross-entropy calls the decoder and the LM head directly, not the
    model's ``forward``: wrapping the whole loss in one module makes DDP (which prepares its
    gradient all-reduce in its own ``forward``) and the FSDP root (which all-gathers the
    embeddings and LM head in its pre-forward hook) see every step."""

    def __init__(self, model, recipe: Recipe | None):
        super().__init__()
        self.model = model
        self.recipe = recipe

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from loralab.fast import forward_loss

        if self.recipe is not None and self.recipe.autocast:  # the study used none; a recipe may ask
            with torch.autocast(batch["input_ids"].device.type, dtype=getattr(torch, self.recipe.compute_dtype)):
                return forward_loss(self.model, batch, self.recipe)
        return forward_loss(self.model, batch, self.recipe)


def single_process_context(cfg: RunConfig) -> DistContext:
    """World size 1: the context one process trains in (no process group)."""
    from loralab.device import resolve_device

    return DistContext(device=resolve_device(cfg.device), grad_accum=cfg.grad_accum)


def wrap_model(model, ctx: DistContext, recipe: Recipe | None = None):
    """The module the step calls (``loss = m(batch)``): the PeftModel in a ``LossModule``; with several
    processes inside DDP, or sharded with FSDP2 (on the meta device or the CPU: sharding moves it)."""
    model = LossModule(model, recipe)
    if ctx.strategy == "ddp":
        if not ctx.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ckpt = recipe is not None and recipe.gradient_checkpointing == "full"
        # static_graph: reentrant checkpointing runs each layer's backward twice through autograd;
        # DDP must know the graph is the same every step. broadcast_buffers=False: RoPE buffers are
        # computed identically on every rank, no need to broadcast them every forward.
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   broadcast_buffers=False, static_graph=ckpt)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if recipe is not None and recipe.gradient_checkpointing == "full" and recipe.checkpoint_layers is None:
        # HF's (reentrant) checkpointing, switched to non-reentrant; loralab's own wrapper already is
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    from loralab.fast import decoder_layers

    for layer in decoder_layers(model.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model):
    """The PeftModel inside DDP / LossModule."""
    while not hasattr(model, "peft_config"):
        model = model.module if hasattr(model, "module") else model.model
    return model


def save_adapter(model, ctx: DistContext, adapter_dir: Path) -> None:
    """Rank 0 writes the adapter; under FSDP every rank first joins the all-gather of the LoRA shards."""
    from torch.distributed.tensor import DTensor

    m = unwrap(model)
    sd = None
    if ctx.strategy == "fsdp" and ctx.enabled:
        sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
              for k, v in m.state_dict().items() if "lora_" in k}
    if ctx.is_main:
        m.save_pretrained(adapter_dir, **({"state_dict": sd} if sd is not None else {}))


# --- batches -------------------------------------------------------------------------------
def global_batch_size(per_gpu: int, world_size: int, grad_accum: int) -> int:
    return per_gpu * world_size * grad_accum


def steps_per_epoch(n_rows: int, per_gpu: int, world_size: int, grad_accum: int) -> int:
    return n_rows // global_batch_size(per_gpu, world_size, grad_accum)  # drop_last, as llama-recipes


def rank_batches(split, per_gpu: int, pad_id: int, rank: int, world_size: int,
                 grad_accum: int, start: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per global step of one epoch, from step ``start`` on, this rank's micro-batches (``grad_accum`` of
    ``per_gpu`` rows each)."""
    from loralab.data import TokenizedSplit, batches

    G = global_batch_size(per_gpu, world_size, grad_accum)
    for g in range(start, steps_per_epoch(len(split.rows), per_gpu, world_size, grad_accum)):
        micro = []
        for m in range(grad_accum):
            start = g * G + (m * world_size + rank) * per_gpu
            rows = TokenizedSplit(rows=split.rows[start:start + per_gpu], n_examples=0, n_tokens=0,
                                  lengths=[], packed=split.packed, seq_len=split.seq_len)
            micro.append(next(batches(rows, per_gpu, pad_id)))
        yield micro


# --- the per-step exchange -----------------------------------------------------------------
def exchange(ctx: DistContext, values: list[float]) -> list[list[float]]:
    """All-gather a few floats from every rank over the control group (CPU); one list per rank."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if ctx.control is None:
        return [values]
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t, group=ctx.control)
    return [o.tolist() for o in out]


def all_reduce_sum(ctx: DistContext, value: int) -> int:
    """The sum of an integer over every rank (the control group, CPU); the value itself in one process."""
    if ctx.control is None:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, group=ctx.control)
    return int(t.item())


def write_rank_record(out_dir: Path, ctx: DistContext, rec: dict) -> None:
    p = Path(out_dir) / f"rank{ctx.rank}_result.json"
    p.write_text(json.dumps({"rank": ctx.rank, "world_size": ctx.world_size, **rec}, indent=1))


# --- memory --------------------------------------------------------------------------------
def predict_peak_distributed(model_config, recipe: Recipe, batch_size: int, seq_len: int, world_size: int,
                             strategy: str, **kw):
    """Per-GPU peak of one training step with DDP or FSDP2, from ``memory.predict_peak``'s terms.

    ``batch_size`` is the per-GPU batch. Assumptions (each a term of the single-GPU breakdown):
    - activations (held, layer backward, logits and loss), buffers, allocator and CUDA context:
      unchanged per GPU: each GPU runs the single-GPU step on its own batch;
    - DDP: weights, LoRA, gradients and AdamW states are replicated; DDP adds its gradient
      buckets, a flat copy of the trainable gradients (``ddp_gradient_buckets`` = LoRA grads bytes;
      PyTorch DDP notes: buckets hold a copy unless gradient_as_bucket_view=True);
    - FSDP2 (``fully_shard`` per decoder layer + root): weights, LoRA, grads and AdamW states
      divided by W (each GPU keeps one shard, padded: ceil); plus the unsharded weights of the
      layers in flight, the current layer and the prefetched next one: 2 x one layer's weights at
      full size, because FSDP2 all-gathers into a new buffer of W x the shard and copies out into
      separately allocated unsharded parameters while the local shard stays resident
      (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py: ``all_gather_output`` of
      ``all_gather_input_numel * world_size``; ``alloc_all_gather_outputs``); under checkpointing
      the recomputed layer's gather in backward is the same 2 layers; the root (embeddings, LM head,
      norms) is all-gathered at full size and not resharded after forward (``_fsdp_state.py``: the
      root's ``post_forward_mesh_info = None``), so it is resident for the whole step, beside its shard.
      Checked against two H200s: benchmarks/results/distributed_EFG_H200x2_20261130-0945.md.
    Returns a ``MemoryBreakdown`` (same ``total`` / ``reserved`` / ``allocated`` semantics).
    """
    from loralab.memory import predict_peak
    from loralab.shape import ModelShape

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: expected an integer >= 1")
    bd = predict_peak(model_config, recipe, batch_size, seq_len, **kw)
    bd.info.update({"world_size": world_size, "strategy": strategy})
    W = world_size
    if W == 1:
        return bd
    if strategy == "ddp":
        bd.add("ddp_gradient_buckets", bd.terms["lora_gradients"], "DDP buckets: a flat copy of the LoRA gradients")
        return _reapply_overhead(bd)
    s = ModelShape.of(model_config)
    weights = {k: v for k, v in bd.terms.items() if k.startswith("weights")}
    w_total = sum(weights.values())
    n_other = s.V * s.H * (1 if s.tied else 2) + s.H  # embeddings, LM head, final norm: the root group
    root_bytes = bd.terms.get("weights_embed_head_norms", 0) * n_other / max(1, n_other + 2 * s.L * s.H)
    layer_bytes = (w_total - root_bytes) / s.L
    for k, v in weights.items():
        bd.terms[k] = int(math.ceil(v / W))
        bd.sources[k] += f"; FSDP: 1/{W} shard per GPU"
    for k in ("lora_adapter", "lora_gradients", "optimizer_states"):
        bd.terms[k] = int(math.ceil(bd.terms[k] / W))
        bd.sources[k] += f"; FSDP: 1/{W} shard per GPU"
    bd.add("fsdp_root_unsharded", root_bytes,
           "FSDP root (embeddings, LM head, final norm) all-gathered at full size, kept for the whole step")
    bd.add("fsdp_layers_in_flight", 2 * layer_bytes,
           "unsharded weights of 2 decoder layers (current + prefetched), full size beside the local shards")
    return _reapply_overhead(bd)


def _reapply_overhead(bd):
    """Keep the breakdown's order after terms changed.

    The allocator terms of ``memory.predict_peak`` (fragmentation from the loss backward and the top
    layer's backward working set, plus a fixed workspace) depend on activations, which are the same
    per GPU under DDP and FSDP: they are carried over unchanged.
    """
    for t in bd.context_terms:  # keep the context last
        if t in bd.terms:
            bd.terms[t] = bd.terms.pop(t)
    return bd


def choose_strategy(model_config, recipe: Recipe, batch_size: int, seq_len: int, world_size: int,
                    capacity_gib: float, allocator_cap: bool = True) -> str:
    """"ddp" when a replica's predicted per-GPU peak fits ``capacity_gib``, else "fsdp"."""
    bd = predict_peak_distributed(model_config, recipe, batch_size, seq_len, world_size, "ddp")
    need = bd.reserved if allocator_cap else bd.total
    return "ddp" if need <= capacity_gib * GIB else "fsdp"


def resolve_strategy(cfg: RunConfig, device: torch.device) -> str:
    """The run's strategy: "auto" is DDP when the memory model says a replica fits the card (or the cap), else
    FSDP; quantized recipes and CPUs always DDP."""
    from loralab.shape import model_config

    if cfg.strategy != "auto":
        return cfg.strategy
    if device.type != "cuda" or cfg.recipe.quantization != "none":
        return "ddp"
    cap = cfg.gpu_memory_gib or torch.cuda.get_device_properties(device).total_memory / GIB
    return choose_strategy(model_config(cfg.model), cfg.recipe, cfg.batch_size, cfg.seq_len, cfg.world_size, cap,
                           allocator_cap=cfg.gpu_memory_gib is not None)


# --- launching -----------------------------------------------------------------------------
def torchrun_command(cfg: RunConfig, out_dir: Path, extra: list[str] | None = None) -> list[str]:
    """The torchrun command line (static rendezvous on master_addr:master_port)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}",
            f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}", f"--master-addr={cfg.master_addr}",
            f"--master-port={cfg.master_port}", "-m", "loralab.train_entry",
            "--config-json", json.dumps(cfg.to_dict()), "--out-dir", str(out_dir)] + list(extra or [])


def merge_rank_records(out_dir: Path, cfg: RunConfig):
    """When rank 0 could not write ``train_result.json`` (a rank died alone), the result from the rank records."""
    from loralab.results import TrainResult

    out_dir = Path(out_dir)
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*_result.json"))]
    if not recs:
        return None
    oom = [r for r in recs if r.get("status") == "oom"]
    first = min(oom, key=lambda r: r["at_step"]) if oom else recs[0]
    steps = [json.loads(l) for l in (out_dir / "steps.jsonl").read_text().splitlines()] if (out_dir / "steps.jsonl").exists() else []
    return TrainResult(status="oom" if oom else "error", batch_size=cfg.batch_size, steps_done=len(steps),
                       losses=[s["loss"] for s in steps], error=first.get("error"),
                       oom_memory={"at_step": first.get("at_step"), "ranks": [r["rank"] for r in oom]},
                       world_size=cfg.world_size, grad_accum=cfg.grad_accum, global_batch_size=cfg.global_batch_size,
                       rank_status=["oom" if any(r["rank"] == i for r in oom) else "stopped by torchrun"
                                    for i in range(cfg.world_size)])


STOP_GRACE_S = 30.0
"""How long the ranks get to finish their step and checkpoint after SIGTERM before they are killed."""


def stop_torchrun(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to torchrun's agent, which passes it to every worker (each finishes its step, checkpoints and
    exits); up to ``grace_s`` for that (a KeyboardInterrupt while waiting: no more waiting); then SIGKILL to
    whatever is left of the tree, workers included (they run in sessions of their own)."""
    import signal

    from loralab.lifecycle import descendants, end_tree, signal_all

    tree = descendants(proc.pid)
    if grace_s > 0:
        signal_all([proc], signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
    tree = tree + descendants(proc.pid)
    signal_all([proc], signal.SIGKILL)
    end_tree(tree, grace_s=0, first=signal.SIGKILL)
    proc.wait()


def launch(cfg: RunConfig, out_dir: Path, progress=print, extra: list[str] | None = None, env: dict | None = None,
           timeout_s: float | None = None):
    """Train ``cfg`` (one batch size) under torchrun: every rank runs ``loralab.train.train_on_rank``.
    Returns this node's ``TrainResult`` (merged from the rank records when a rank died alone). On KeyboardInterrupt
    (the kernel was interrupted) or any other exception the ranks get SIGTERM and ``STOP_GRACE_S`` to checkpoint,
    then are killed (``stop_torchrun``); if this process dies, torchrun gets SIGTERM (PR_SET_PDEATHSIG)."""
    import signal
    import threading

    from loralab.lifecycle import preexec_die_with_parent
    from loralab.results import TrainResult

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(cfg, out_dir, extra)
    progress("launching: torchrun " + " ".join(cmd[3:cmd.index("--config-json")]) + " ...")
    e = {**os.environ, **(env or {})}
    e.setdefault("OMP_NUM_THREADS", "1")
    with (out_dir / "torchrun.log").open("w") as logf:
        # own session (a terminal's Ctrl-C reaches the kernel, not the ranks mid-collective); torchrun gets SIGTERM
        # when this process ends, however it ends, and its agent stops its workers (which checkpoint)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e,
                                start_new_session=True, preexec_fn=preexec_die_with_parent(signal.SIGTERM))

        def pump():
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                if line.startswith("[loralab]"):
                    progress(line[len("[loralab]"):].strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_torchrun(proc, grace_s=0)
            rc = proc.returncode
            logf.write(f"[loralab] launch killed after {timeout_s} s\n")
        except BaseException:  # KeyboardInterrupt (the kernel was interrupted) or anything else: the ranks stop too
            stop_torchrun(proc)
            raise
        finally:
            reader.join(timeout=10)
    res = TrainResult.load(out_dir) if cfg.node_rank == 0 else None
    if res is None:
        res = merge_rank_records(out_dir, cfg)
        if res is None:
            tail = (out_dir / "torchrun.log").read_text().splitlines()[-5:]
            res = TrainResult(status="error" if rc else "ok", batch_size=cfg.batch_size, world_size=cfg.world_size,
                              error=f"torchrun exited {rc}: " + " | ".join(tail))
        if cfg.node_rank == 0:
            res.save(out_dir)
    return res
