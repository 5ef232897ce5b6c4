"""run_all.py with a user's own model: a Hugging Face folder written by save_pretrained (no loralab files in it)
and a Meta checkpoint folder (params.json, consolidated.00.pth, tokenizer.model). Every notebook must run.

Before the one model-shape lookup (loralab.shape.model_config), notebook 02 failed on both ("model preset '/path':
expected one of tiny, llama2-7b or a model folder") and notebook 04 failed on the Meta folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_setup", "01_data", "02_memory_math", "03_training_bs2", "04_profiling_bs2", "05_summaries", "06_report"]


def run_all(model: Path, out: Path, run_id: str) -> dict:
    r = subprocess.run([sys.executable, "run_all.py", "--model", str(model), "--recipe", "demo", "--batch-sizes", "2",
                        "--max-steps", "2", "--seq-len", "128", "--eval-examples", "4", "--out", str(out),
                        "--run-id", run_id], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads((out / run_id / "summary.json").read_text())
    assert [n["notebook"] + (f"_{n['tag']}" if n["tag"] else "") for n in s["notebooks"]] == NOTEBOOKS
    assert all(n["status"] == "ok" for n in s["notebooks"]), s["notebooks"]
    assert s["sweep"][0]["status"] == "ok" and s["sweep"][0]["final_loss"] > 0
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
    s = run_all(folder, tmp_path / "out", "hf")
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
    s = run_all(meta, tmp_path / "out", "meta")
    assert s["random_weights"] is False
