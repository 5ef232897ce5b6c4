"""A user's own model through every notebook's work: a Hugging Face folder written by save_pretrained (no loralab
files in it) and a Meta checkpoint folder (params.json, consolidated.00.pth, tokenizer.model).

Before the one model-shape lookup (loralab.shape.model_config), notebook 02 failed on both ("model preset '/path':
expected one of tiny, llama2-7b or a model folder") and notebook 04 failed on the Meta folder. Each notebook's
library call runs here directly (set-up, data, memory math, training, profiling, summaries, the report);
tests/test_run_all.py runs the notebooks themselves, end to end.
"""

import sys
from pathlib import Path

import pytest
import torch

from loralab import data_prep, profiling, setup, summaries
from loralab.autobatch import largest_batch_that_fits
from loralab.config import RunConfig
from loralab.memory import predict_peak
from loralab.run_folder import RunFolder
from loralab.shape import model_config
from loralab.train import run_training


def every_stage(model: Path, out: Path) -> dict:
    """What run_all.py --model MODEL --recipe demo --batch-sizes 2 --max-steps 2 --seq-len 128 --eval-examples 4
    has each notebook do, in order; the run's summary."""
    cfg = RunConfig.from_options(model=str(model), recipe="demo", batch_sizes=[2], max_steps=2, seq_len=128,
                                 eval_examples=4, device="cpu")
    run = RunFolder.create(out, "run")
    run.save_config(cfg)
    assert setup.prepare(cfg, run).model_folder  # 00
    assert data_prep.prepare(cfg, run).train_chunks > 0  # 01
    mcfg = model_config(cfg.model)  # 02: the memory math from the folder's shape
    assert predict_peak(mcfg, cfg.recipe, 2, cfg.seq_len).total > 0
    assert largest_batch_that_fits(mcfg, cfg.recipe, cfg.seq_len, 40) >= 1
    tr = run_training(cfg.at_batch(2), run.batch_dir(2), progress=lambda *a: None)  # 03
    assert tr.status == "ok" and tr.final_loss > 0
    assert profiling.run(cfg.at_batch(2), run).flops_per_step > 0  # 04
    ev = summaries.run(cfg, run, adapter_dir=run.best_adapter([2]), max_new_tokens=8, batch_size=4)  # 05
    assert ev.n == 4 and ev.adapter_life.passed
    report = run.report(cfg)  # 06
    assert report.status(2) == "ok" and report.profiles[2] is not None
    s = run.collect_summary(cfg, [], "now", 0.0)
    assert s["sweep"][0]["status"] == "ok" and s["sweep"][0]["final_loss"] > 0 and s["eval"]["n"] == 4
    return s


@pytest.mark.slow
def test_a_hugging_face_folder_written_by_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from loralab.model import materialize_preset

    preset = materialize_preset("tiny", progress=lambda *a: None)
    folder = tmp_path / "my-llama"
    AutoModelForCausalLM.from_pretrained(preset).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(preset / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    assert not list(folder.glob("loralab*"))  # nothing of loralab's in it: a user's folder
    s = every_stage(folder, tmp_path / "out")
    assert s["random_weights"] is False and s["config"]["model"] == str(folder)


@pytest.mark.slow
def test_a_meta_checkpoint_folder(tmp_path):
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    from loralab.builtin_data import make_builtin_dataset
    from loralab.data import format_prompt

    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import hf_config, to_meta, write_meta  # the converter's own fake Meta checkpoint

    tok = tmp_path / "sp"
    tok.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(format_prompt(e) for e in make_builtin_dataset()["train"][:500]),
                                   model_prefix=str(tok / "tokenizer"), vocab_size=300, model_type="bpe",
                                   num_threads=1, minloglevel=2)
    torch.manual_seed(0)
    meta = write_meta(tmp_path / "llama-2-tiny", to_meta(LlamaForCausalLM(hf_config()).eval()),
                      tokenizer=tok / "tokenizer.model")
    s = every_stage(meta, tmp_path / "out")
    assert s["random_weights"] is False
