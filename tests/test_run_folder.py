"""The run folder's owner and the typed results: layout, save/load, summary, best adapter, the index page."""

import json

from loralab import index_page
from loralab.config import RunConfig
from loralab.results import AutoBatchResult, DataResult, ProfileResult, SetupResult, TrainResult
from loralab.run_folder import RunFolder


def test_each_result_round_trips_through_its_folder(tmp_path):
    run = RunFolder.create(tmp_path, "r")
    data = DataResult(source="builtin", train_chunks=3, steps_per_epoch={1: 3, 2: 1}, matches_study=False)
    setup = SetupResult(environment={"python": "3.12"}, parameters=7)
    tr = TrainResult(status="ok", batch_size=2, steps_done=5, adapter_dir=str(tmp_path / "a"), losses=[1.0, 0.5])
    prof = ProfileResult(batch_size=2, flops_per_step=10.0, macs_per_step=5.0, tflops_per_s=0.1, mfu=0.2)
    for r in (data, setup, tr, prof):
        run.save(r)
    assert run.data() == data and run.data().steps_per_epoch == {1: 3, 2: 1}  # int keys back from JSON
    assert run.setup() == setup and run.training(2) == tr and run.profile(2) == prof
    assert run.training(1) is None and run.evaluation() is None
    assert (run.batch_dir(2) / TrainResult.FILE).is_file() and (run.results_dir / DataResult.FILE).is_file()
    run.forget_training(2)
    assert run.training(2) is None


def test_unknown_fields_are_ignored(tmp_path):
    """A result written by another loralab version still loads."""
    (tmp_path / AutoBatchResult.FILE).write_text(json.dumps({"chosen": 4, "tried": [], "new_field": 1}))
    assert AutoBatchResult.load(tmp_path).chosen == 4


def test_create_never_overwrites(tmp_path):
    RunFolder.create(tmp_path, "r")
    try:
        RunFolder.create(tmp_path, "r")
    except Exception as e:  # noqa: BLE001
        assert "never overwrites" in str(e)
    else:
        raise AssertionError("a second run folder of the same name was made")


def test_best_adapter_is_the_one_that_saw_most_rows(tmp_path):
    run = RunFolder(tmp_path)
    run.save(TrainResult(status="ok", batch_size=1, steps_done=10, adapter_dir="a1"))
    run.save(TrainResult(status="ok", batch_size=4, steps_done=3, adapter_dir="a4"))
    run.save(TrainResult(status="oom", batch_size=8, steps_done=0, adapter_dir=None))
    assert run.best_adapter([1, 4, 8]) == "a4"  # 12 rows against 10
    assert RunFolder(tmp_path / "none").best_adapter([1]) == ""


def test_summary_rows_say_why_a_batch_size_has_no_result(tmp_path):
    run = RunFolder(tmp_path)
    cfg = RunConfig(model="tiny", batch_sizes=[1, 2, 4], device="cpu")
    run.save(TrainResult(status="ok", batch_size=1, final_loss=2.0, tokens_per_s=100.0))
    run.save(ProfileResult(batch_size=1, flops_per_step=10.0, macs_per_step=5.0, tflops_per_s=0.1, mfu=0.2))
    run.save(DataResult(train_chunks=9, val_chunks=1, test_chunks=1, train_tokens=99))
    records = [{"notebook": "03_training", "tag": "bs2", "status": "error", "error": "ValueError: x"}]
    s = run.collect_summary(cfg, records, "now", 1.0, {"status": "failed"})
    rows = {r["batch_size"]: r for r in s["sweep"]}
    assert rows[1]["status"] == "ok" and rows[1]["flops_per_step"] == 10.0 and rows[1]["mfu"] == 0.2
    assert rows[2]["status"] == "error" and rows[2]["error"] == "ValueError: x"
    assert rows[4]["status"] == "not run" and rows[4]["error"] is None
    assert s["data"]["train_chunks"] == 9 and s["status"] == "failed" and s["run_id"] == tmp_path.name


def test_scaling_against_a_reference(tmp_path):
    ref = RunFolder.create(tmp_path, "ref")
    ref.write_summary({"sweep": [{"batch_size": 2, "status": "ok", "tokens_per_s": 100.0, "world_size": 1}]})
    run = RunFolder.create(tmp_path, "two")
    run.save(TrainResult(status="ok", batch_size=2, tokens_per_s=190.0, world_size=2))
    cfg = RunConfig(model="tiny", batch_sizes=[2, 4], device="cpu", scaling_reference=str(ref.path))
    report = run.report(cfg)
    (row,) = report.scaling.rows
    assert row["speed-up"] == 1.9 and row["efficiency"] == 0.95
    assert run.scaling().rows == report.scaling.rows  # saved for summary.json
    assert report.status(4).startswith("–") and report.value(2, "tokens_per_s") == 190.0


def test_a_notebook_alone_writes_under_loralab_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_OUTPUTS", str(tmp_path))
    run = RunFolder.for_notebook("", "01_data")
    assert run.path.parent == tmp_path / "notebooks" and run.name.startswith("01_data-")
    assert RunFolder.for_notebook(str(tmp_path / "given"), "01_data").path == tmp_path / "given"
    assert RunFolder.latest() is None
    made = RunFolder.create(tmp_path, "r")
    made.save_config(RunConfig(model="tiny", device="cpu"))
    assert RunFolder.latest().path == made.path and made.load_config().model == "tiny"


def test_index_page_links_only_reports_that_exist_and_escapes(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "00_setup.html").write_text("x")
    cfg = RunConfig(model="tiny", batch_sizes=[1], device="cpu")
    records = [{"notebook": "00_setup", "tag": "", "label": "00_setup", "status": "ok", "error": None,
                "elapsed_s": 1.0, "html": "00_setup.html"},
               {"notebook": "03_training", "tag": "bs1", "label": "03_training bs1", "status": "error",
                "error": "ValueError: <b>bad</b>", "elapsed_s": 2.0, "html": "03_training_bs1.html",
                "failure": "error: ValueError: <b>bad</b>"}]
    summary = run.collect_summary(cfg, records, "now", 3.0, {
        "status": "failed", "planned": 3, "failures": ["03_training bs1 (error)"], "not_run": ["06_report"],
        "plan": ["00_setup", "03_training bs1", "06_report"]})
    page = index_page.render(run, records, summary)
    assert '<a href="00_setup.html">report</a>' in page and "03_training_bs1.html" not in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad</b>" not in page
    assert "<b>Failed</b>: 1 of 3 notebooks failed." in page and "class='notrun'>not run" in page
    assert "Built-in tiny model" in page and "cross-batch report" not in page
