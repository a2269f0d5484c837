"""Runs that lose nothing, against S3 faults: a proxy in front of SeaweedFS (tests/faulty_s3.py)
answers 503 SlowDown, resets connections and drops responses at a set rate -- the run retries
and completes exactly once; it denies access or the bucket is missing -- the run fails, clearly,
and commits nothing."""

from __future__ import annotations

import http.client
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml
from faulty_s3 import FaultyS3, reads_of, writes_under

from vision_ops.cli import EXIT_FAILED, main
from vision_ops.config import JobSpec, parse_spec
from vision_ops.pipeline import run_job
from vision_ops.sink import committed_runs, read_committed_file, verify_run
from vision_ops.storage import StorageError

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
RUN_DATE = "2026-11-24"
MISSING_BUCKET = "no-such-bucket-xyz"


@pytest.fixture(scope="module")
def photos(s3fs_client: Any, photo_paths: list[Path]) -> tuple[str, list[str]]:
    """The sample photographs under a fresh prefix of s3://images: (prefix URI, object URIs)."""
    prefix = f"images/faults-{uuid.uuid4().hex[:8]}"
    for path in photo_paths:
        s3fs_client.put_file(str(path), f"{prefix}/{path.name}")
    return f"s3://{prefix}/", sorted(f"s3://{prefix}/{path.name}" for path in photo_paths)


@pytest.fixture
def output() -> str:
    return f"s3://out/faults-{uuid.uuid4().hex[:8]}"


def job(
    inputs: str, output: str, tiny_weights: Path, endpoint_url: str, run_id: str
) -> dict[str, Any]:
    return {
        "input": {"uris": [inputs]},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(tiny_weights),
            "num_classes": 4,
            "preprocessing": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 2, "read_batch_size": 2, "max_actors": 1},
        "output": {"uri": output, "rows_per_file": 2},
        "run": {"id": run_id, "date": RUN_DATE},
        "storage_options": {"s3": {"endpoint_url": endpoint_url}},
    }


def spec(*args: Any) -> JobSpec:
    return parse_spec(job(*args))


def committed_rows(output: str, run_id: str, options: dict[str, Any]) -> pa.Table:
    manifest, problems = verify_run(output, run_id, options)
    assert problems == []
    tables = [read_committed_file(entry["uri"], options) for entry in manifest["files"]]
    return pa.concat_tables(tables).sort_by("source_uri")


def nothing_written(seaweed: Any, s3fs_client: Any, output: str) -> None:
    root = output.removeprefix("s3://")
    assert committed_runs(output, {"s3": {"endpoint_url": seaweed.endpoint_url}}) == []
    s3fs_client.invalidate_cache()
    assert [p for p in s3fs_client.find(root) if "/run_date=" in p] == []


# --- the proxy itself ------------------------------------------------------------------------


def test_the_proxy_forwards_and_injects_what_it_counts(seaweed: Any) -> None:
    """Raw requests, unsigned: SeaweedFS itself answers those it forwards (403, its Server
    header); the injected 503 is S3 XML; the reset is a reset; a denial is S3's AccessDenied."""
    with FaultyS3(
        seaweed.endpoint_url,
        slowdown_every=2,
        reset_every=3,
        faulty=lambda request: request.bucket == "images",
        deny=reads_of("images", "secret.png"),
    ) as proxy:
        host, port = proxy.endpoint_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)

        def get(path: str, **kwargs: Any) -> tuple[http.client.HTTPResponse, bytes]:
            connection.request(kwargs.pop("method", "GET"), path, **kwargs)
            response = connection.getresponse()
            return response, response.read()

        response, _ = get("/images/a.png")
        assert response.getheader("Server", "").startswith("SeaweedFS")
        # A chunked body goes through whole: SeaweedFS answers, the connection stays usable.
        response, _ = get("/images/b.png", method="PUT", body=iter([b"abc", b"de"]),
                          encode_chunked=True)  # fmt: skip
        assert response.getheader("Server", "").startswith("SeaweedFS")
        response, body = get("/images/c.png")
        assert response.status == 503 and ET.fromstring(body).findtext("Code") == "SlowDown"
        connection.request("GET", "/images/d.png")
        with pytest.raises(ConnectionResetError):
            connection.getresponse()
        connection.close()
        response, body = get("/images/secret.png")
        assert response.status == 403 and ET.fromstring(body).findtext("Code") == "AccessDenied"
        response, _ = get("/models/not-faulty")
        assert response.getheader("Server", "").startswith("SeaweedFS")
    assert proxy.requests == {"GET": 5, "PUT": 1}
    assert proxy.faults == {("slowdown", "GET"): 1, ("reset", "GET"): 1, ("denied", "GET"): 1}


# --- transient faults: retried ---------------------------------------------------------------


def test_transient_faults_on_reads_and_writes_are_retried_and_lose_nothing(
    ray_local: None, seaweed: Any, photos: tuple[str, list[str]], output: str, tiny_weights: Path
) -> None:
    inputs, uris = photos
    direct = {"s3": {"endpoint_url": seaweed.endpoint_url}}
    # Per method and bucket: every 5th request a 503, every 6th a reset before it reaches the
    # server, every 9th a reset after the server carried it out (the client cannot know).
    with FaultyS3(
        seaweed.endpoint_url, slowdown_every=5, reset_every=6, drop_response_every=9
    ) as proxy:
        summary = run_job(spec(inputs, output, tiny_weights, proxy.endpoint_url, "faulty"))
    assert (summary.commit.rows, summary.commit.ok) == (5, 5)
    for fault in ("slowdown", "reset", "dropped_response"):
        assert proxy.fault_count(fault) > 0, (fault, proxy.faults)
    for method in ("GET", "PUT"):
        assert proxy.fault_count("slowdown", method) + proxy.fault_count("reset", method) > 0
    faulted_photo_reads = {
        path
        for method, path, outcome in proxy.log
        if method == "GET"
        and path.startswith(inputs.removeprefix("s3:/"))
        and outcome != "forwarded"
    }
    assert faulted_photo_reads, proxy.log  # the Ray read tasks' own GETs were faulted too
    rows = committed_rows(output, "faulty", direct)
    assert rows["source_uri"].to_pylist() == uris  # each listed photo once
    assert set(rows["status"].to_pylist()) == {"ok"}
    clean_output = f"{output}-clean"
    run_job(spec(inputs, clean_output, tiny_weights, seaweed.endpoint_url, "faulty"))
    clean = committed_rows(clean_output, "faulty", direct)
    assert rows["label_id"].to_pylist() == clean["label_id"].to_pylist()
    np.testing.assert_allclose(
        np.array(rows["score"].to_pylist(), dtype=float),
        np.array(clean["score"].to_pylist(), dtype=float),
        atol=1e-6,
    )


# --- permanent faults: the run fails, nothing committed ---------------------------------------


def test_denied_writes_to_the_output_fail_the_run_and_commit_nothing(
    ray_local: None, seaweed: Any, s3fs_client: Any, photos: tuple[str, list[str]], output: str,
    tiny_weights: Path,
) -> None:  # fmt: skip
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    denied = pytest.raises(StorageError, match=r"(?i)access denied")
    with FaultyS3(seaweed.endpoint_url, deny=writes_under(bucket, prefix)) as proxy, denied:
        run_job(spec(photos[0], output, tiny_weights, proxy.endpoint_url, "denied"))
    assert proxy.fault_count("denied", "PUT") > 0
    nothing_written(seaweed, s3fs_client, output)


def test_denied_writes_to_the_output_name_the_output_in_the_error(
    ray_local: None, seaweed: Any, photos: tuple[str, list[str]], output: str, tiny_weights: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    with FaultyS3(seaweed.endpoint_url, deny=writes_under(bucket, prefix)) as proxy:
        raw = job(photos[0], output, tiny_weights, proxy.endpoint_url, "denied")
        with pytest.raises(StorageError) as err:
            run_job(parse_spec(raw))
        message = str(err.value)
        assert "access denied" in message.lower() and output in message
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        assert main(["run", str(path)]) == EXIT_FAILED  # `error: ...`, not a traceback
    shown = capsys.readouterr().err
    assert "access denied" in shown.lower() and output in shown


def test_a_denied_manifest_write_commits_nothing(
    ray_local: None, seaweed: Any, s3fs_client: Any, photos: tuple[str, list[str]], output: str,
    tiny_weights: Path,
) -> None:  # fmt: skip
    """Denied at the last step, the commit itself: nothing is committed, the data files already
    moved into the partition are taken back out (plain Parquet readers see none), and a rerun
    with access commits the run whole."""
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    direct = {"s3": {"endpoint_url": seaweed.endpoint_url}}
    deny = writes_under(bucket, f"{prefix}/_manifests/")
    denied = pytest.raises(StorageError, match=r"(?i)access denied")
    with FaultyS3(seaweed.endpoint_url, deny=deny) as proxy, denied as err:
        run_job(spec(photos[0], output, tiny_weights, proxy.endpoint_url, "manifest"))
    assert output in str(err.value)
    assert proxy.fault_count("denied", "PUT") == 1
    assert committed_runs(output, direct) == []
    assert verify_run(output, "manifest", direct)[1] == [f"{output}: no committed run manifest"]
    s3fs_client.invalidate_cache()
    assert s3fs_client.glob(f"{output.removeprefix('s3://')}/run_date=*/*.parquet") == []
    run_job(spec(photos[0], output, tiny_weights, seaweed.endpoint_url, "manifest"))
    assert committed_rows(output, "manifest", direct)["source_uri"].to_pylist() == photos[1]


def test_a_denied_input_becomes_an_error_row_and_the_rest_commit(
    ray_local: None, seaweed: Any, photos: tuple[str, list[str]], output: str, tiny_weights: Path
) -> None:
    inputs, uris = photos
    denied_uri = uris[1]
    bucket, _, key = denied_uri.removeprefix("s3://").partition("/")
    with FaultyS3(seaweed.endpoint_url, deny=reads_of(bucket, key)) as proxy:
        summary = run_job(spec(inputs, output, tiny_weights, proxy.endpoint_url, "input"))
    assert proxy.fault_count("denied") > 0
    assert (summary.commit.rows, summary.commit.ok, summary.commit.errors) == (5, 4, 1)
    rows = committed_rows(output, "input", {"s3": {"endpoint_url": seaweed.endpoint_url}})
    assert rows["source_uri"].to_pylist() == uris
    by_uri = {row["source_uri"]: row for row in rows.to_pylist()}
    denied = by_uri.pop(denied_uri)
    assert (denied["status"], denied["error_type"]) == ("error", "PermissionError")
    assert denied["error_message"]  # s3fs says "Forbidden" (the 403 of a HEAD has no body)
    assert {row["status"] for row in by_uri.values()} == {"ok"}


@pytest.fixture
def missing_bucket(s3fs_client: Any) -> Iterator[str]:
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists(MISSING_BUCKET)
    yield f"s3://{MISSING_BUCKET}/out"
    s3fs_client.invalidate_cache()
    if s3fs_client.exists(MISSING_BUCKET):  # the run created it: leave the server as it was
        s3fs_client.rm(MISSING_BUCKET, recursive=True)


def test_a_missing_output_bucket_fails_the_run_and_creates_nothing(
    ray_local: None, seaweed: Any, s3fs_client: Any, photos: tuple[str, list[str]],
    missing_bucket: str, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The command says nothing was done (it promised a resume from staged rows, none)."""
    path = tmp_path / "job.yaml"
    raw = job(photos[0], missing_bucket, tiny_weights, seaweed.endpoint_url, "nobucket")
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["run", str(path)]) == EXIT_FAILED
    [said] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert said == (
        f"error: cannot write {missing_bucket}: the bucket {MISSING_BUCKET} does not exist; "
        "nothing was done"
    )
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists(MISSING_BUCKET)
