"""The index of finished runs that `distilflow report --latest` reads: damage to it is skipped or named,
never a traceback; the report never presents a bundle the gate rejected as the one to ship."""


import pytest

from distilflow.flows.cli import main
from distilflow.tasks import history
from distilflow.tasks.errors import DistilflowError

JOURNEY = [{"state": "deployed", "task_score": 0.5, "perplexity": 9.0, "size_bytes": 1000, "params": 100,
            "bits_per_param": 4.0, "tokens_per_s": 10.0}]


def record(run_id: str, passed: bool = True) -> dict:
    checks = [{"key": "deploy.gate.min_task_score", "passed": passed, "detail": "task score 0.500 < 0.900"}]
    return {"run_id": run_id, "mlflow_run_id": "m", "mlflow_tracking_uri": "sqlite:///x.db", "bundle": f"/b/{run_id}",
            "journey": JOURNEY, "release": {"model_name": "tiny", "version": "2" if not passed else "1",
                                            "checks": checks, "champion": "1",
                                            "aliases": ["champion"] if passed else ["candidate"], "passed": passed}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_line_cut_short_in_the_index_is_skipped_and_the_next_run_still_recorded(tmp_path, home):
    history.record_run(tmp_path / "work", record("first"), home)
    with open(home / "history.jsonl", "a") as index:
        index.write('{"run_id": "cut", "rec')  # a crash or a full disk mid-line
    history.record_run(tmp_path / "work", record("second"), home)
    assert history.latest_run(home)["run_id"] == "second"
    assert len((home / "history.jsonl").read_text().splitlines()) == 3


def test_a_corrupt_last_line_of_the_index_falls_back_to_the_run_before(tmp_path, home):
    history.record_run(tmp_path / "work", record("first"), home)
    with open(home / "history.jsonl", "ab") as index:
        index.write(b"\xff\xfe garbage\n")
    assert history.latest_run(home)["run_id"] == "first"


def test_an_unreadable_run_record_is_named_with_what_to_do(tmp_path, home, capsys):
    path = history.record_run(tmp_path / "work", record("first"), home)
    path.write_text('{"run_id": ')
    assert main(["report", "--latest"]) == 2
    assert f"the latest run's record {path} is unreadable" in capsys.readouterr().err


def test_report_of_a_run_the_gate_rejected_marks_its_bundle_and_names_the_champion(tmp_path, home, capsys):
    history.record_run(tmp_path / "work", record("rejected", passed=False), home)
    assert main(["report", "--latest"]) == 0
    out = capsys.readouterr().out
    assert "bundle:        /b/rejected  (REJECTED by the deploy gate: not the one to ship)  (no longer on disk)" in out
    assert "gate:          FAILED (deploy.gate.min_task_score: task score 0.500 < 0.900); `champion` is version 1" in out


def test_distilflow_home_with_an_unset_variable_is_refused(monkeypatch):
    monkeypatch.setenv("DISTILFLOW_HOME", "$DISTILFLOW_TEST_UNSET/home")
    monkeypatch.delenv("DISTILFLOW_TEST_UNSET", raising=False)
    with pytest.raises(DistilflowError, match="DISTILFLOW_HOME='\\$DISTILFLOW_TEST_UNSET/home' names a variable"):
        history.distilflow_home()


def test_distilflow_home_with_a_tilde_and_a_variable_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DISTILFLOW_TEST_SUB", "sub")
    monkeypatch.setenv("DISTILFLOW_HOME", "~/$DISTILFLOW_TEST_SUB/home")
    assert history.distilflow_home() == tmp_path / "sub" / "home"


def test_distilflow_home_that_is_a_file_fails_before_the_run(tmp_path):
    (tmp_path / "home").write_text("")
    with pytest.raises(DistilflowError, match="DISTILFLOW_HOME .*home: cannot write in .*home \\(a file, not a directory; it holds the index of finished runs\\)"):
        history.check_home(tmp_path / "home")
