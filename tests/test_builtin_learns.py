"""Issue bar: the built-in default really learns. On its held-out split, the fine-tuned tiny model's
ROUGE-L beats the base model's by at least 0.20 (absolute), with the default run's recipe and budget."""

import pytest
import torch

from loralab.adapter import load_adapter
from loralab.config import TINY_DEFAULTS, RunConfig
from loralab.data import load_splits, prompt_ids
from loralab.evaluate import generate_summaries, rouge_scores
from loralab.model import load_base_model, load_tokenizer_for, resolve_model_folder
from loralab.train import run_training


@pytest.mark.slow
def test_builtin_default_learns_to_summarise(tmp_path):
    # What `python run_all.py` trains at its largest batch (8): the demo recipe, the default step budget.
    cfg = RunConfig(model="tiny", recipe=TINY_DEFAULTS["recipe"], batch_sizes=[8], seq_len=2048,
                    max_steps=TINY_DEFAULTS["max_steps"], device="cpu")
    result = run_training(cfg, tmp_path, progress=lambda *a: None)
    assert result.status == "ok"
    tok = load_tokenizer_for(cfg)
    splits = load_splits("builtin")

    test = splits["test"].select(range(50))  # a datasets.Dataset: [:50] would give columns
    prompts = [prompt_ids(tok, ex, with_summary=False) for ex in test]
    refs = [ex["summary"] for ex in test]
    base = load_base_model(resolve_model_folder("tiny"), cfg.recipe, torch.device("cpu"))
    base_l = [s["rougeL"] for s in rouge_scores(generate_summaries(base, tok, prompts).texts, refs)]
    tuned = load_adapter(base, result.adapter_dir)
    tuned_l = [s["rougeL"] for s in rouge_scores(generate_summaries(tuned, tok, prompts).texts, refs)]
    base_mean, tuned_mean = sum(base_l) / len(base_l), sum(tuned_l) / len(tuned_l)
    assert tuned_mean - base_mean >= 0.20, (base_mean, tuned_mean)
