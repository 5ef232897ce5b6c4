#!/usr/bin/env python
"""Run loralab's notebooks headless for a sweep of batch sizes and write HTML reports.

    python run_all.py                                   # built-in tiny model + data, CPU, bs 1 4 7 8
    python run_all.py --model llama2-7b --tokenizer TOKENIZER --data SAMSUM_DIR \\
        --recipe seed --batch-sizes 1 4 7 8 --gpu-memory-gib 40 --max-steps 8

Every run writes a new folder outputs/<run-id>/ with each executed notebook (.ipynb and
.html), index.html linking them, and summary.json. Bad input exits with code 2 and one
line naming the input; no run folder is made.
"""

from __future__ import annotations

import argparse
import sys

from loralab.config import ATTENTION, ConfigError, RECIPES


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", nargs="+", default=["1", "4", "7", "8"],
                   help="per-step batch sizes to sweep, or 'auto' (largest that fits the card)")
    p.add_argument("--model", default="tiny", help="preset (tiny, llama2-7b), HF folder, or Meta checkpoint folder")
    p.add_argument("--tokenizer", default="", help="tokenizer.model file or tokenizer folder (default: the model's)")
    p.add_argument("--data", default="builtin", help="'builtin', a folder (train/val/test files, or save_to_disk), or a .json/.jsonl/.csv/.parquet file")
    p.add_argument("--recipe", default="", help=f"one of {', '.join(RECIPES)} (default: demo for the tiny model, seed otherwise)")
    p.add_argument("--attn", default="", help=f"override the recipe's attention: {', '.join(ATTENTION)}")
    p.add_argument("--seq-len", type=int, default=2048, help="packed chunk length in tokens")
    pk = p.add_mutually_exclusive_group()
    pk.add_argument("--packing", dest="packing", action="store_true", default=None,
                    help="pack prompts into seq-len chunks (default: the recipe's; seed packs)")
    pk.add_argument("--no-packing", dest="packing", action="store_false", help="one dialogue per row, padded")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each run after N steps (default: full epochs; 300 for the tiny demo)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap GPU memory to emulate a smaller card (40 = A100-40GB)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-examples", type=int, default=50, help="test dialogues summarised in notebook 05")
    p.add_argument("--notebooks", nargs="+", default=["00", "01", "02", "03", "04", "05", "06"],
                   help="which notebooks to run (prefixes), e.g. --notebooks 00 01 03 06")
    g = p.add_argument_group("several GPUs and nodes (torchrun)")
    g.add_argument("--nproc", type=int, default=1, help="GPUs (processes) per node; > 1 trains under torchrun; batch sizes are per GPU")
    g.add_argument("--strategy", default="auto", help="ddp (a replica per GPU), fsdp (sharded weights) or auto (the memory model decides)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps; global batch = batch x GPUs x this")
    g.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each with its --node-rank")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank (0 .. nnodes-1)")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (torchrun rendezvous)")
    g.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0")
    g.add_argument("--scaling-reference", default="", metavar="RUN_DIR",
                   help="an earlier run folder of the same model, recipe and sequence length on fewer GPUs: "
                        "the report adds a scaling plot and table (tokens/s, speed-up, efficiency per batch size)")
    p.add_argument("--out", default="outputs", help="parent folder of run folders")
    p.add_argument("--run-id", default="", help="run folder name (default: timestamp-model-recipe); never reused")
    return p.parse_args(argv)


def to_sweep_args(ns):
    from loralab.runner import SweepArgs, launch_args

    if ns.batch_sizes == ["auto"]:
        batch_sizes = "auto"
    else:
        batch_sizes = []
        for b in ns.batch_sizes:
            try:
                batch_sizes.append(int(b))
            except ValueError:
                raise ConfigError(f"--batch-sizes {b!r}: expected integers >= 1 or 'auto'") from None
            if batch_sizes[-1] < 1:
                raise ConfigError(f"--batch-sizes {b}: expected integers >= 1 or 'auto'")
    return SweepArgs(batch_sizes=batch_sizes, model=ns.model, tokenizer=ns.tokenizer, data=ns.data,
                     recipe=ns.recipe, attn=ns.attn, seq_len=ns.seq_len, packing=ns.packing,
                     epochs=ns.epochs, max_steps=ns.max_steps, gpu_memory_gib=ns.gpu_memory_gib,
                     device=ns.device, seed=ns.seed, out=ns.out, run_id=ns.run_id,
                     notebooks=ns.notebooks, eval_examples=ns.eval_examples,
                     launch=launch_args(nproc=ns.nproc, strategy=ns.strategy, grad_accum=ns.grad_accum,
                                         nnodes=ns.nnodes, node_rank=ns.node_rank, master_addr=ns.master_addr,
                                         master_port=ns.master_port),
                     scaling_reference=ns.scaling_reference)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        from loralab.runner import run_sweep

        run_sweep(to_sweep_args(ns))
    except ConfigError as e:
        print(f"run_all.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
