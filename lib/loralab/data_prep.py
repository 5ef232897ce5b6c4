"""Notebook 01's work: the data as the run trains on it.

``prepare(cfg, run)`` loads the splits, tokenises them with the run's tokenizer and the study's prompt, packs
(or not, per the recipe) and counts: dialogues, prompts, tokens, chunks, the tail dropped, steps per epoch per
batch size, and whether the set-up is the study's (then its 1555 / 84 / 87 chunks are shown beside). It saves a
``DataResult``.
"""

from __future__ import annotations

from loralab import study
from loralab.config import RunConfig
from loralab.data import PROMPT_TEMPLATE, format_prompt, load_splits, prompt_ids, tokenize_splits
from loralab.model import load_tokenizer_for
from loralab.results import DataResult
from loralab.run_folder import RunFolder

AUTO_SHOWN = [1, 2, 4, 8]
"""Batch sizes shown before ``--batch-sizes auto`` has chosen one."""


def prepare(cfg: RunConfig, run: RunFolder) -> DataResult:
    splits = load_splits(cfg.data)
    tok = load_tokenizer_for(cfg)
    ex = splits["train"][0]
    tsplits = tokenize_splits(tok, splits, cfg.seq_len, cfg.packing)
    is_study = cfg.packing and cfg.seq_len == 2048 and tsplits["train"].n_tokens == study.TRAIN_TOKENS
    study_chunks = {"train": study.TRAIN_CHUNKS, "val": study.VAL_CHUNKS, "test": study.TEST_CHUNKS}
    rows = []
    for name, ts in tsplits.items():
        row = {"split": name, "prompts": ts.n_examples, "tokens": ts.n_tokens,
               "mean tokens per prompt": round(ts.n_tokens / max(1, ts.n_examples), 1),
               "chunks" if cfg.packing else "rows": len(ts.rows),
               "tokens dropped (tail)": ts.n_tokens - len(ts.rows) * cfg.seq_len if cfg.packing else 0}
        if is_study:
            row["study"] = study_chunks.get(name)
        rows.append(row)
    shown = cfg.batch_sizes if cfg.batch_sizes != "auto" else AUTO_SHOWN
    result = DataResult(
        source=str(cfg.data), tokenizer=str(tok.source), seq_len=cfg.seq_len, packing=cfg.packing,
        dialogues=[{"split": k, "dialogues": len(v), "empty dialogues": sum(1 for e in v if not e["dialogue"].strip())}
                   for k, v in splits.items()],
        examples=[dict(splits["train"][i]) for i in range(min(3, len(splits["train"])))],
        prompt_template=PROMPT_TEMPLATE + "{summary}</s>", example_prompt=format_prompt(ex),
        example_ids=prompt_ids(tok, ex), eos_id=tok.eos_id, train_lengths=list(map(int, tsplits["train"].lengths)),
        splits=rows, train_chunks=len(tsplits["train"].rows), val_chunks=len(tsplits["val"].rows),
        test_chunks=len(tsplits["test"].rows), train_tokens=tsplits["train"].n_tokens,
        steps_per_epoch={b: tsplits["train"].steps_per_epoch(b) for b in shown}, matches_study=is_study)
    run.save(result)
    return result
