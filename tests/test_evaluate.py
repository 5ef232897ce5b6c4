"""evaluate.py: ROUGE pinned by hand, bootstrap, and greedy batched generation on a tiny Llama."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

from loralab.config import ConfigError
from loralab.evaluate import (
    DECODING,
    ROUGE_KEYS,
    aggregate,
    bootstrap_ci,
    cut_at_eos,
    eval_summary_dict,
    generate_summaries,
    paired_difference,
    rouge_scores,
    split_sentences,
)


# ---------------------------------------------------------------- stand-ins --

class CharTokenizer:
    """loralab's TextTokenizer interface, char-level: 0 unk, 1 bos, 2 eos, printable ASCII and newline after."""

    bos_id, eos_id, pad_id = 1, 2, None
    chars = "\n" + "".join(chr(c) for c in range(32, 127))
    vocab_size = 3 + len(chars)

    def encode(self, text):
        return [3 + self.chars.index(c) if c in self.chars else 0 for c in text]

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


def tiny_llama(seed=0, vocab=CharTokenizer.vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def prompt(tok, dialog):
    return [tok.bos_id] + tok.encode(f"Summarize this dialog:\n{dialog}\n---\nSummary:\n")


# ------------------------------------------------------------------- ROUGE --

def test_rouge_identical_is_one_and_disjoint_is_zero():
    same = rouge_scores(["Amanda will bring cookies."], ["Amanda will bring cookies."])[0]
    assert all(same[k] == pytest.approx(1.0) for k in ROUGE_KEYS)
    none = rouge_scores(["zebra quartz"], ["Amanda will bring cookies."])[0]
    assert all(none[k] == 0.0 for k in ROUGE_KEYS)
    empty = rouge_scores([""], ["Amanda will bring cookies."])[0]
    assert all(empty[k] == 0.0 for k in ROUGE_KEYS)


def test_rouge_hand_computed_lin_2004_example():
    # Lin (2004) sec. 3.1: reference "police killed the gunman", candidate "the gunman kill police".
    # Stemming makes killed == kill, so every unigram matches: ROUGE-1 = 4/4.
    # Bigrams: ref {police kill, kill the, the gunman}, cand {the gunman, gunman kill, kill police}: 1 of 3.
    # LCS = "the gunman" = 2 tokens: P = R = 2/4, F1 = 0.5.
    s = rouge_scores(["the gunman kill police"], ["police killed the gunman"])[0]
    assert s["rouge1"] == pytest.approx(1.0)
    assert s["rouge2"] == pytest.approx(1 / 3)
    assert s["rougeL"] == pytest.approx(0.5)
    assert s["rougeLsum"] == pytest.approx(0.5)


def test_rouge_lsum_uses_sentence_split():
    # pred tokens [anna is late tom wait(s)], ref [tom wait(s) anna is late]: LCS = 3 of 5 -> 0.6.
    # Summary level: ref sentence "tom waits" matched by pred sentence 2 (2), "anna is late" by 1 (3): 5/5.
    s = rouge_scores(["Anna is late. Tom waits."], ["Tom waits. Anna is late."])[0]
    assert s["rougeL"] == pytest.approx(0.6)
    assert s["rougeLsum"] == pytest.approx(1.0)


def test_split_sentences():
    assert split_sentences("Hi there! How are you? Fine.  ") == "Hi there!\nHow are you?\nFine."
    assert split_sentences("no end mark") == "no end mark"
    assert split_sentences("") == ""


def test_rouge_length_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="predictions"):
        rouge_scores(["a", "b"], ["a"])


# --------------------------------------------------------------- bootstrap --

def test_bootstrap_deterministic_and_contains_mean():
    vals = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.7, 0.0]
    a, b = bootstrap_ci(vals, seed=3), bootstrap_ci(vals, seed=3)
    assert a == b
    assert a["mean"] == pytest.approx(sum(vals) / len(vals))
    assert a["ci_low"] <= a["mean"] <= a["ci_high"]
    assert a["ci_low"] < a["ci_high"]
    assert bootstrap_ci(vals, seed=4) != a


def test_bootstrap_constant_values_has_zero_width():
    c = bootstrap_ci([0.25] * 10)
    assert c == {"mean": 0.25, "ci_low": 0.25, "ci_high": 0.25}


def test_bootstrap_rejects_empty():
    with pytest.raises(ConfigError):
        bootstrap_ci([])


def test_paired_difference_and_summary_dict():
    refs = ["Tom will buy milk.", "Anna is late.", "They meet at noon.", "Bob lost his keys."]
    base = rouge_scores(["zebra", "quartz", "nothing", "blue"], refs)
    ft = rouge_scores(["Tom will buy milk.", "Anna is late today.", "They meet at noon.", "Bob lost keys."], refs)
    diff = paired_difference(base, ft)
    assert diff["rouge1"]["mean"] == pytest.approx(aggregate(ft)["rouge1"]["mean"] - aggregate(base)["rouge1"]["mean"])
    assert diff["rougeL"]["ci_low"] > 0.5
    d = eval_summary_dict(base, ft)
    assert d["n"] == 4
    assert set(d["rouge_base"]) == set(ROUGE_KEYS) == set(d["rouge_finetuned"])
    assert d["rouge_base"]["rougeL"] == 0.0
    assert d["rouge_finetuned"]["rougeL"] - d["rouge_base"]["rougeL"] >= 0.20
    only_base = eval_summary_dict(base, None)
    assert only_base["rouge_finetuned"] is None and only_base["diff_finetuned_minus_base"] is None
    with pytest.raises(ConfigError):
        paired_difference(base, ft[:2])


# -------------------------------------------------------------- generation --

DIALOGS = ["Tom: hi\nAnna: hello", "Bob: where are the keys?\nEve: in the car, I think. Check it.", "A: ok"]


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 2, 2], 2) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], 2) == [5, 6, 7]


def test_batched_left_padded_greedy_equals_one_by_one():
    tok, model = CharTokenizer(), tiny_llama()
    prompts = [prompt(tok, d) for d in DIALOGS]
    batched = generate_summaries(model, tok, prompts, max_new_tokens=12, batch_size=3)
    single = [generate_summaries(model, tok, [p], max_new_tokens=12, batch_size=1) for p in prompts]
    assert batched.generated_ids == [s.generated_ids[0] for s in single]
    assert batched.raw_texts == [s.raw_texts[0] for s in single]
    # no EOS from a random model in 12 steps (or cut at it): each row has at most 12 tokens
    assert all(1 <= len(g) <= 12 for g in batched.generated_ids)
    assert batched.n_generated_tokens == sum(len(g) for g in batched.generated_ids)
    assert batched.tokens_per_s > 0 and batched.seconds > 0
    assert batched.memory_kind.startswith("cpu process RSS")
    assert batched.settings["do_sample"] is False and batched.settings["max_new_tokens"] == 12


def test_prompt_stripped_and_matches_manual_greedy():
    tok, model = CharTokenizer(), tiny_llama()
    p = prompt(tok, DIALOGS[0])
    res = generate_summaries(model, tok, [p], max_new_tokens=6)
    # greedy by hand: argmax of the last position, appended, six times
    ids = torch.tensor([p])
    manual = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            manual.append(nxt)
            if nxt == tok.eos_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert res.generated_ids[0] == manual
    assert res.raw_texts[0] == tok.decode(manual)


def test_model_generation_config_sampling_is_ignored():
    tok, model = CharTokenizer(), tiny_llama()
    prompts = [prompt(tok, d) for d in DIALOGS]
    greedy = generate_summaries(model, tok, prompts, max_new_tokens=8).generated_ids
    # a checkpoint like Llama 2 chat ships do_sample=True, temperature 0.6, top_p 0.9
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.top_p = 0.5
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert generate_summaries(model, tok, prompts, max_new_tokens=8).generated_ids == greedy


def test_stops_at_eos_and_restores_train_mode():
    tok, model = CharTokenizer(), tiny_llama()

    def force_eos(_mod, _inp, out):
        out[..., tok.eos_id] += 1e4
        return out

    h = model.lm_head.register_forward_hook(force_eos)
    model.train()
    res = generate_summaries(model, tok, [prompt(tok, d) for d in DIALOGS], max_new_tokens=10, batch_size=2)
    h.remove()
    assert model.training
    assert res.generated_ids == [[tok.eos_id]] * 3
    assert res.texts == ["", "", ""] and res.n_generated_tokens == 3


def test_newline_cut():
    tok, model = CharTokenizer(), tiny_llama()
    newline = tok.encode("\n")[0]
    step = {"n": 0}

    def emit(_mod, _inp, out):  # emits "ab\ncd" then EOS, via the logits
        seq = tok.encode("ab\ncd") + [tok.eos_id]
        out[..., seq[min(step["n"], len(seq) - 1)]] += 1e4
        step["n"] += 1
        return out

    model.lm_head.register_forward_hook(emit)
    # the hook counts forward calls: no untimed warm-up call before the one it scripts
    res = generate_summaries(model, tok, [prompt(tok, "A: x")], max_new_tokens=10, warmup=False)
    assert newline in res.generated_ids[0]
    assert res.raw_texts[0] == "ab\ncd" and res.texts[0] == "ab"


def test_bad_arguments():
    tok, model = CharTokenizer(), tiny_llama()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_summaries(model, tok, [[1, 5]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="prompts"):
        generate_summaries(model, tok, [[1, 5], []])


def test_kv_cache_used_even_when_training_turned_it_off():
    tok, model = CharTokenizer(), tiny_llama()
    model.config.use_cache = False  # as loralab.model.load_base_model leaves it for training
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[1]))
    p = prompt(tok, "A: hi")
    generate_summaries(model, tok, [p], max_new_tokens=5, warmup=False)  # only the timed call's forwards
    assert seen[0] == len(p) and all(n == 1 for n in seen[1:])  # one new token per step: cache in use


def test_decoding_settings_are_greedy():
    assert DECODING["do_sample"] is False and DECODING["num_beams"] == 1
    assert DECODING["repetition_penalty"] == 1.0


# ---------------------------------------------------------------- notebook 05's work --

def random_adapter(folder: Path, out: Path) -> Path:
    """A (random, non-zero) LoRA adapter on q_proj and v_proj of the model in ``folder``, saved in ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(out)
    return out


@pytest.mark.slow
def test_summaries_with_an_adapter_score_reload_merge_and_export(tmp_path):
    """Notebook 05's work on the tiny preset with a random adapter: scores, speed, and the adapter's life."""
    from loralab import summaries
    from loralab.config import RunConfig
    from loralab.model import materialize_preset
    from loralab.results import EvaluationResult
    from loralab.run_folder import RunFolder

    adapter = random_adapter(materialize_preset("tiny"), tmp_path / "adapter")
    cfg = RunConfig(model="tiny", eval_examples=4, device="cpu")
    run = RunFolder(tmp_path / "run")
    r = summaries.run(cfg, run, adapter_dir=str(adapter), max_new_tokens=8, batch_size=2, show_examples=2,
                      export_dir=str(tmp_path / "merged"))
    assert r.random_weights  # the tiny preset's base is random: the notebook says its summaries are noise
    assert run.load(EvaluationResult).to_dict() == json.loads(json.dumps(r.to_dict(), default=str)) and r.n == 4
    assert set(r.rouge_finetuned) == set(ROUGE_KEYS) and set(r.diff_finetuned_minus_base) == set(ROUGE_KEYS)
    assert len(r.examples) == 2 and {"dialogue", "reference", "base", "fine-tuned", "ROUGE-L base"} <= set(r.examples[0])
    for s in r.generation.values():
        assert s["tokens_per_s"] > 0 and s["peak_memory_gib"] >= 0 and s["n_generated_tokens"] > 0
    life = r.adapter_life
    assert life.reload_max_logit_diff == 0.0 and life.reload_same_summaries
    assert life.merge_max_logit_diff < 1e-5 and life.passed is True and life.failures() == []
    assert (tmp_path / "merged" / "config.json").is_file() and "config.json" in life.exported_files


def test_adapter_check_failures_are_named():
    """A wrong reload or merge fails notebook 05 (summaries.run raises with these); bf16 has no pass/fail."""
    from loralab.results import AdapterChecks

    ok = AdapterChecks(reload_max_logit_diff=0.0, reload_same_summaries=True, merge_max_logit_diff=2e-6,
                       merge_tolerance=1e-5, passed=True)
    assert ok.failures() == []
    bad = AdapterChecks(reload_max_logit_diff=0.5, reload_same_summaries=False, merge_max_logit_diff=1.0,
                        merge_tolerance=1e-5, passed=False)
    assert bad.failures() == ["reloaded adapter does not reproduce the trained model",
                              "merged logits differ by 1.00e+00 (> 1.0e-05)"]
    assert AdapterChecks(dtype="bfloat16", merge_max_logit_diff=0.3, passed=None).failures() == []


def test_merge_tolerance_is_relative_with_a_floor():
    from loralab.summaries import merge_tolerance

    assert merge_tolerance(0.1) == 1e-5 and merge_tolerance(50.0) == pytest.approx(5e-4)


def test_summaries_without_an_adapter_score_the_base_only(tmp_path):
    from loralab import summaries
    from loralab.config import RunConfig
    from loralab.run_folder import RunFolder

    r = summaries.run(RunConfig(model="tiny", eval_examples=2, device="cpu"), RunFolder(tmp_path), max_new_tokens=4,
                      batch_size=2)
    assert r.n == 2 and r.rouge_finetuned is None and r.adapter_life is None
    assert r.adapter_life_skipped.startswith("no adapter")



def test_warmup_call_is_untimed_and_changes_nothing():
    """One 2-token generate before the timed ones; the summaries are the same with or without it."""
    tok, model = CharTokenizer(), tiny_llama()
    prompts = [prompt(tok, d) for d in DIALOGS]
    calls = []
    real = model.generate

    def counting(*a, **kw):
        calls.append(kw["generation_config"].max_new_tokens)
        return real(*a, **kw)

    model.generate = counting
    warm = generate_summaries(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert calls[0] == 2 and calls[1:] == [12] * -(-len(prompts) // 2)
    calls.clear()
    cold = generate_summaries(model, tok, prompts, max_new_tokens=12, batch_size=2, warmup=False)
    assert calls == [12] * -(-len(prompts) // 2)
    assert warm.generated_ids == cold.generated_ids
    assert warm.settings["warmup"] is True and cold.settings["warmup"] is False
