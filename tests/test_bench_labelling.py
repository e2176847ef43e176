"""The labelling benchmark measures what it says: a real llama.cpp server of the tiny teacher's GGUF, labelled
through distilflow's HTTP teacher at each level of requests in flight."""

import pytest

from distilflow.configs.loader import load_config
from distilflow.tasks import gguf_export
from tests.benchmarks.bench_labelling import measure
from tests.conftest import TINY_CONFIG, TINY_TEACHER


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "q8_0", name="tiny")


def test_every_request_is_answered_at_each_level_with_its_own_server_slots(tiny_gguf):
    result = measure(tiny_gguf, load_config(TINY_CONFIG), requests=4, levels=[1, 2])
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["server_slots"] == level["concurrency"]
        assert level["labels"] == level["requests"] == 4 and level["failures"] == 0 and level["error"] is None
        assert level["labels_per_s"] > 0 and level["seconds"] > 0
        assert level["hours_for_100000_tickets"] == pytest.approx(100_000 / level["labels_per_s"] / 3600, rel=0.01)
        assert level["valid_labels"] == 4 and level["retries"] >= 0  # llama.cpp reads the guided choice as a grammar
    assert set(result["hours_for_100000_tickets"]) == {"1", "2"}
    assert len(result["load_before"]) == len(result["load_after"]) == 3
