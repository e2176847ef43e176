"""run.artifact_store: stage artifacts shared through a store (a local directory URL, and a real S3-compatible server on
127.0.0.1), with the local cache's guarantees: content-addressed, checked against the manifest, never seen half-written,
one writer per key."""

import os
import threading
import time

import pytest

from distilflow.configs.loader import load_config
from distilflow.tasks import artifact_store, artifacts
from distilflow.tasks.artifact_store import ArtifactStore, StoreUnreachable, check_store
from distilflow.tasks.errors import DistilflowError
from tests.conftest import TINY_CONFIG, free_port
from distilflow.flows.retries import is_transient
from tests.team_stack import CuttableLink, s3_server
from tests.test_artifacts import DemoOutput, producer


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server; this process's S3 clients reach it through the standard AWS_* variables."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {key: os.environ.get(key) for key in server["env"]}
        os.environ.update(server["env"])
        try:
            yield server
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path / 'store'}")
    return ArtifactStore(f"{request.getfixturevalue('s3')['url']}/{tmp_path.name}")


def test_a_second_machine_downloads_the_published_artifact_instead_of_producing_it(store, tmp_path):
    calls = []
    first = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer(calls), DemoOutput, store)
    second = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-b", producer(calls), DemoOutput, store)
    assert len(calls) == 1 and not first.cached and second.cached
    assert second.digest == first.digest
    assert second.model.joinpath("weights.bin").read_text() == "weights"
    assert second.directory == tmp_path / "machine-b" / "artifacts" / "demo" / "k1"


def test_fetched_reads_what_another_machine_published(store, tmp_path):
    published = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer([]), DemoOutput, store)
    fetched = artifacts.fetched("demo", "k1", tmp_path / "machine-b", DemoOutput, store)
    assert fetched.digest == published.digest and fetched.metrics == {"score": 1.0}


def test_fetching_an_artifact_nobody_published_names_the_store(store, tmp_path):
    with pytest.raises(DistilflowError, match="not in run.artifact_store"):
        artifacts.fetched("demo", "never", tmp_path / "machine-b", DemoOutput, store)


def test_a_failed_stage_publishes_nothing_to_the_store(store, tmp_path):
    def crash(out_dir):
        (out_dir / "half.bin").write_text("half")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", crash, DemoOutput, store)
    assert store.published("demo", "k1") is None


def test_an_upload_without_its_marker_is_never_read_and_the_next_writer_publishes(store, tmp_path):
    """What a crash mid-upload leaves: files under an upload prefix, no marker."""
    store.fs.pipe_file(f"{store.root}/demo/k1/deadbeef/result.json", b"{half")
    calls = []
    result = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer(calls), DemoOutput, store)
    assert calls and not result.cached
    assert store.published("demo", "k1")["upload"] != "deadbeef"


def test_a_tampered_object_in_the_store_is_refused_on_download(store, tmp_path):
    artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer([]), DemoOutput, store)
    upload = store.published("demo", "k1")["upload"]
    store.fs.pipe_file(f"{store.root}/demo/k1/{upload}/model/weights.bin", b"tampered")
    with pytest.raises(DistilflowError, match="does not match its manifest.*changed: model/weights.bin"):
        artifacts.fetched("demo", "k1", tmp_path / "machine-b", DemoOutput, store)
    assert not (tmp_path / "machine-b" / "artifacts" / "demo" / "k1").exists()


def test_a_local_artifact_made_before_the_store_was_set_is_published_to_it(store, tmp_path):
    calls = []
    artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer(calls), DemoOutput)
    result = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer(calls), DemoOutput, store)
    assert len(calls) == 1 and result.cached and store.published("demo", "k1")


def test_a_second_writer_waits_for_the_first_and_reuses_its_artifact(store, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_store, "LEASE_POLL_S", 0.1)
    calls, started = [], threading.Event()

    def slow(out_dir):
        started.set()
        time.sleep(1.5)
        return producer(calls)(out_dir)

    first = threading.Thread(target=artifacts.cached_or_run,
                             args=("demo", "k1", tmp_path / "machine-a", slow, DemoOutput, store))
    first.start()
    started.wait(30)
    second = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-b", producer(calls), DemoOutput, store)
    first.join()
    assert len(calls) == 1 and second.cached


def test_a_lease_whose_holder_stopped_renewing_it_is_taken_over(store, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_store, "LEASE_TTL_S", 0.5)
    monkeypatch.setattr(artifact_store, "LEASE_POLL_S", 0.1)
    store.fs.pipe_file(f"{store.root}/demo/k1/lease.json", b'{"host": "gone", "pid": 1}')
    time.sleep(1.0)
    result = artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer([]), DemoOutput, store)
    assert not result.cached and not store.fs.exists(f"{store.root}/demo/k1/lease.json")


def test_an_unreachable_store_is_a_transient_error_that_names_it(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = ArtifactStore(f"{s3['url']}/unreachable")
    store.fs.retries = 1
    with pytest.raises(StoreUnreachable, match=r"run.artifact_store s3://distilflow/unreachable does not answer") as err:
        artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", producer([]), DemoOutput, store)
    assert is_transient(err.value)


def test_preflight_refuses_a_bucket_that_does_not_exist(s3):
    with pytest.raises(DistilflowError, match="s3://no-such-bucket/x: cannot write there"):
        check_store("s3://no-such-bucket/x")


@pytest.mark.parametrize("url, problem", [("nosuchscheme://bucket/x", "not a storage fsspec knows"),
                                          ("file://relative/dir", "needs an absolute path")])
def test_an_artifact_store_url_fsspec_cannot_use_is_a_config_error(url, problem, tmp_path):
    with pytest.raises(DistilflowError, match=f"run.artifact_store.*{problem}"):
        load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), "run.artifact_store": url})


def test_a_store_cut_off_mid_stage_fails_transiently_naming_it_and_publishes_nothing(s3, tmp_path, monkeypatch):
    """The network path to the S3 server is cut while the stage works; the server keeps its state, and once the
    path is back it holds no marker: nothing half-published for anyone to read."""
    link = CuttableLink(s3["port"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{link.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = ArtifactStore(f"{s3['url']}/{tmp_path.name}")
    store.fs.retries = 1

    def cut_mid_stage(out_dir):
        link.cut()
        return producer([])(out_dir)

    with pytest.raises(StoreUnreachable, match="does not answer") as err:
        artifacts.cached_or_run("demo", "k1", tmp_path / "machine-a", cut_mid_stage, DemoOutput, store)
    assert is_transient(err.value)
    link.restore()
    assert store.published("demo", "k1") is None
