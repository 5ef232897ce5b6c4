#!/usr/bin/env python
"""Run loralab's notebooks headless for a sweep of batch sizes and write HTML reports.

    python run_all.py                                   # built-in tiny model + data, CPU, bs 1 4 7 8
    python run_all.py --model llama2-7b --tokenizer TOKENIZER --data SAMSUM_DIR \\
        --recipe seed --batch-sizes 1 4 7 8 --gpu-memory-gib 40 --max-steps 8
    python run_all.py --plan --model llama2-7b --recipes seed fast --price A100-80GB=1.9   # no GPU, seconds

Every run writes a new folder outputs/<run-id>/ with each executed notebook (.ipynb and
.html), index.html linking them, summary.json, run_status.json and progress.log. Exit status:
0 every notebook succeeded; 1 the run failed (a notebook, a diverged training, a full disk;
one line on stderr says which); 2 bad input, one line naming it, no run folder made; 130 / 143
interrupted by Ctrl-C / SIGTERM: the training checkpoints and stops, and

    python run_all.py --resume outputs/<run-id>

continues the run in its folder (completed notebooks kept, the training from its checkpoint).

Each flag sets the RunConfig field of the same name (loralab/config.py documents them all).
"""

from __future__ import annotations

import argparse
import sys

from loralab.config import ATTENTION, RECIPES, USER_RECIPES, ConfigError, RunConfig


def batch_sizes(values: list[str]) -> list[int] | str:
    if values == ["auto"]:
        return "auto"
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise ConfigError(f"--batch-sizes {v!r}: expected integers >= 1 or 'auto'") from None
        if out[-1] < 1:
            raise ConfigError(f"--batch-sizes {v}: expected integers >= 1 or 'auto'")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", nargs="+", default=None,
                   help="per-step batch sizes to sweep (default 1 4 7 8), or 'auto' (largest that fits the card; GPU "
                        "only); with --plan: the batch sizes to plan (default: the largest that fits each card)")
    p.add_argument("--model", default="tiny", help="preset (tiny, llama2-7b, llama2-13b), HF folder, or Meta checkpoint folder")
    p.add_argument("--tokenizer", default="", help="tokenizer.model file or tokenizer folder (default: the model's)")
    p.add_argument("--data", default="builtin",
                   help="'builtin', a SAMSum folder, a .json/.jsonl/.csv/.parquet file, or a saved dataset folder")
    p.add_argument("--recipe", default="", help=f"one of {', '.join(USER_RECIPES)} (default: demo for the tiny model, "
                   f"seed otherwise); variants: {', '.join(r for r in RECIPES if r not in USER_RECIPES)}")
    p.add_argument("--attn", default="", help=f"override the recipe's attention: {', '.join(ATTENTION)}")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the recipe's; seed: 8)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: the recipe's; seed: 32)")
    p.add_argument("--lora-targets", default=None,
                   help="LoRA target modules: 'q,v', 'all-linear', or names (q_proj,k_proj,... or q,k,v,o,gate,up,down)")
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
    p.add_argument("--checkpoint-every-min", type=float, default=10.0,
                   help="training checkpoints every N minutes and at the end (0: only at the end); the last two kept")
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
    pl = p.add_argument_group("plan before you launch (no GPU, no weights: seconds)")
    pl.add_argument("--plan", action="store_true", help="print, per card x recipe, whether it fits, the largest batch, "
                    "predicted peak memory, tok/s, epoch time and cost; runs nothing")
    pl.add_argument("--recipes", nargs="+", default=None, help="recipes to plan (default: --recipe's, or seed fast qlora)")
    pl.add_argument("--cards", nargs="+", default=None, help="cards to plan (default: the catalogue's eight)")
    pl.add_argument("--cards-file", default="", help="JSON file of extra cards (the form of lib/loralab/cards.json)")
    pl.add_argument("--price", action="append", default=[], metavar="CARD=USD",
                    help="price per GPU-hour, e.g. --price A100-80GB=1.9 (repeatable; no built-in prices)")
    pl.add_argument("--tokens", type=int, default=None, help="train tokens per epoch (default: counted from --data, "
                    "or SAMSum's 3,184,816 when no --data is given)")
    pl.add_argument("--calibration", default="", help="time-model calibration JSON (default: lib/loralab/time_calibration.json)")
    pl.add_argument("--json", action="store_true", help="with --plan: the rows as JSON")
    p.add_argument("--out", default="outputs", help="parent folder of run folders")
    p.add_argument("--run-id", default="", help="run folder name (default: time-model-recipe-suffix); never reused")
    p.add_argument("--resume", default="", metavar="RUN_DIR",
                   help="continue an interrupted or failed run in its own folder with its own options (run_config.json): "
                        "completed notebooks are kept, a training continues from its last checkpoint")
    return p


PLAN_ONLY = ("plan", "recipes", "cards", "cards_file", "price", "tokens", "calibration", "json")


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """The run's RunConfig from the command line: each flag is the RunConfig field of the same name."""
    options = vars(parser().parse_args(argv))
    options.pop("resume")
    plan_only = {k: options.pop(k) for k in PLAN_ONLY}
    if any(v for k, v in plan_only.items() if k != "plan") and not plan_only["plan"]:
        used = [f"--{k.replace('_', '-')}" for k, v in plan_only.items() if v and k != "plan"]
        raise ConfigError(f"{' '.join(used)}: only with --plan")
    options["batch_sizes"] = batch_sizes(options["batch_sizes"] or ["1", "4", "7", "8"])
    return RunConfig.from_options(**options)


def plan_from_args(argv: list[str] | None = None) -> str:
    """``--plan``: the plan table (or JSON rows) for the run's model, recipes, sequence length and data."""
    from loralab import plan
    from loralab.config import apply_lora_options, get_recipe

    o = vars(parser().parse_args(argv))
    bs = batch_sizes(o["batch_sizes"]) if o["batch_sizes"] else None
    if bs == "auto":
        bs = None
    names = o["recipes"] or ([o["recipe"]] if o["recipe"] else ["seed", "fast", "qlora"])
    recipes = []
    for n in names:
        r = get_recipe(n)
        if o["attn"]:
            r = r.replace(attn_implementation=o["attn"])
        recipes.append(apply_lora_options(r, o["lora_r"], o["lora_alpha"], o["lora_targets"]))
    if o["packing"] is False:
        raise ConfigError("--plan --no-packing: the plan counts packed chunks of --seq-len; expected packing")
    model = o["model"] if o["model"] != "tiny" or o["data"] != "builtin" else "tiny"
    return plan.run_plan(model=model, recipes=recipes, cards=o["cards"], seq_len=o["seq_len"], tokens=o["tokens"],
                         data="" if o["data"] == "builtin" and o["tokens"] is None and model != "tiny" else o["data"],
                         tokenizer=o["tokenizer"], batch_sizes=bs, prices=o["price"], cards_file=o["cards_file"],
                         calibration=o["calibration"], as_json=o["json"])


def resume_dir(argv: list[str] | None = None) -> str:
    """--resume RUN_DIR's folder ("" without it); it takes no other option (the run keeps its own)."""
    ns, defaults = vars(parser().parse_args(argv)), vars(parser().parse_args([]))
    others = sorted(f"--{k.replace('_', '-')}" for k, v in ns.items() if k != "resume" and v != defaults[k])
    if ns["resume"] and others:
        raise ConfigError(f"--resume takes no other option (the run keeps the options in its run_config.json); "
                          f"got {' '.join(others)}")
    return ns["resume"]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every notebook succeeded; 1 the run failed (a notebook, a training that diverged, a full disk);
    2 bad input, no run folder made; 130 / 143 interrupted by SIGINT / SIGTERM (``--resume`` continues it).
    Whatever ends a run early ends with one line on stderr."""
    from loralab.lifecycle import Interrupted, StopOnSignal

    if "--plan" in (sys.argv[1:] if argv is None else argv):
        try:
            print(plan_from_args(argv))
            return 0
        except ConfigError as e:
            print(f"run_all.py: error: {e}", file=sys.stderr)
            return 2
    with StopOnSignal() as stop:
        try:
            from loralab import sweep

            run = resume_dir(argv)
            result = sweep.resume_sweep(run, stop=stop) if run else sweep.run_sweep(config_from_args(argv), stop=stop)
        except ConfigError as e:
            print(f"run_all.py: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # before a run folder exists (e.g. a cache that cannot be written)
            print(f"run_all.py: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
            return 2
        except Interrupted as e:
            print(f"run_all.py: interrupted ({e}) before the run started; no run folder was made", file=sys.stderr)
            return stop.exit_code
    if result.message:
        print(f"run_all.py: {result.message}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
