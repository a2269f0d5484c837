"""The run's listing held by Ray, on a real local cluster and a real S3 server: an S3 Inventory
manifest streamed by Ray Data, prefixes paged into the object store, each URI once, a bad
manifest refused before any work, and a run from a manifest equal to a listed run."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vision_ops.config import InputSpec, parse_spec
from vision_ops.inventory import column_name
from vision_ops.pipeline import listing as listing_module
from vision_ops.pipeline import run_job
from vision_ops.pipeline.listing import held_listing, list_listing
from vision_ops.sink import committed_runs
from vision_ops.sources import SourceError, plan_inputs, read_manifest
from vision_ops.tally import listed_tally

pytestmark = [pytest.mark.s3, pytest.mark.timeout(600)]
PREFIX = "images/streamed"


@pytest.fixture(scope="module")
def streamed_objects(s3fs_client: Any) -> dict[str, dict[str, Any]]:
    """Six seeded PNGs (and a note) under s3://images/streamed/, with their listing info."""
    rng = np.random.default_rng(7)
    for index in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
        s3fs_client.pipe(f"{PREFIX}/{index // 3}/img{index:02d}.png", buffer.getvalue())
    s3fs_client.pipe(f"{PREFIX}/readme.txt", b"not an image")
    found = s3fs_client.find(PREFIX, detail=True)
    return {f"s3://{name}": info for name, info in found.items() if name.endswith(".png")}


def inventory(objects: dict[str, dict[str, Any]], order: list[str] | None = None) -> pa.Table:
    """An S3 Inventory Parquet table of `objects` (in `order`, repeats allowed)."""
    uris = order if order is not None else sorted(objects)
    return pa.table(
        {
            "bucket": [uri.split("/")[2] for uri in uris],
            "key": [uri.split("/", 3)[3] for uri in uris],
            "size": pa.array([objects[u]["size"] for u in uris], pa.int64()),
            "last_modified_date": pa.array(
                [objects[u]["LastModified"] for u in uris], pa.timestamp("ms", tz="UTC")
            ),
            "e_tag": [objects[u]["ETag"] for u in uris],
            "storage_class": ["STANDARD"] * len(uris),
        }
    )


def put_parquet(fs: Any, path: str, table: pa.Table) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.pipe(path, buffer.getvalue())
    return f"s3://{path}"


def listing_of(spec: InputSpec, options: Any) -> tuple[list[dict[str, Any]], Any]:
    listing = list_listing(spec, plan_inputs(spec, options), options)
    return listing.table().to_pylist(), listing


def test_an_s3_inventory_manifest_streams_into_the_listing(
    ray_local, s3fs_client, s3_options, streamed_objects
) -> None:
    manifest = put_parquet(
        s3fs_client, "images/lists/inventory.parquet", inventory(streamed_objects)
    )
    from_manifest, listing = listing_of(InputSpec(manifest=manifest), s3_options)
    from_prefix, prefix_listing = listing_of(InputSpec(uris=[f"s3://{PREFIX}/"]), s3_options)
    assert [row["source_uri"] for row in from_manifest] == sorted(streamed_objects)
    assert from_manifest == from_prefix  # the inventory's identity is the listing's
    assert from_manifest == read_manifest(manifest, s3_options)
    assert listing.count == prefix_listing.count == 6
    assert listing.tally() == listed_tally(sorted(streamed_objects))
    assert listing.summary.snapshot.hexdigest() == prefix_listing.summary.snapshot.hexdigest()
    uri = sorted(streamed_objects)[4]
    from vision_ops.tally import bucket_of

    assert uri in listing.in_buckets({bucket_of(uri)})


def test_a_uri_named_twice_is_kept_once_the_first_naming_wins(
    ray_local, s3fs_client, s3_options, streamed_objects, monkeypatch
) -> None:
    uris = sorted(streamed_objects)
    repeated = [uris[0], uris[3], uris[0], *uris[1:], uris[0]]
    table = inventory(streamed_objects, repeated)
    table = table.set_column(table.schema.get_field_index("e_tag"), "e_tag", pa.array(
        [f"manifest-{i}" for i in range(len(repeated))]))  # fmt: skip
    manifest = put_parquet(s3fs_client, "images/lists/repeats.parquet", table)
    rows, listing = listing_of(InputSpec(manifest=manifest), s3_options)
    assert [row["source_uri"] for row in rows] == uris and listing.count == 6
    assert listing.tally() == listed_tally(uris)
    # Listed and in the manifest: the listing (named first) keeps its identity.
    both = InputSpec(uris=[f"s3://{PREFIX}/0/"], manifest=manifest)
    rows, listing = listing_of(both, s3_options)
    assert [row["source_uri"] for row in rows] == uris and listing.count == 6
    etags = {row["source_uri"]: row["source_etag"] for row in rows}
    assert [etags[u] for u in uris[:3]] == [
        streamed_objects[u]["ETag"].strip('"') for u in uris[:3]
    ]
    assert etags[uris[3]] == "manifest-1" and etags[uris[4]] == "manifest-6"
    # past the limit on repeats, refused before they are gathered on the driver
    monkeypatch.setattr(listing_module, "MAX_REPEATED_URIS", 1)
    with pytest.raises(SourceError, match=r"^2 inputs are named more than once .* at most 1"):
        listing_of(InputSpec(manifest=manifest), s3_options)


def test_a_listing_held_here_is_the_one_listed_into_ray(
    ray_local, s3fs_client, s3_options, streamed_objects
) -> None:
    """`held_listing` (a run in this process) lists an s3:// prefix, and a folder beside it
    naming some of its objects again, as `list_listing` lists them into Ray: the same rows,
    each URI once (the first part's), the same count, tally and snapshot digest (so a run's
    resume key is the same whichever runs it); past `most` inputs, None."""
    uris = sorted(streamed_objects)
    spec = InputSpec(uris=[f"s3://{PREFIX}/", f"s3://{PREFIX}/0/"])
    inputs = plan_inputs(spec, s3_options)
    held = held_listing(spec, inputs)
    assert held is not None
    rows, listing = listing_of(spec, s3_options)
    assert held.rows.sort_by("source_uri").to_pylist() == rows
    assert [row["source_uri"] for row in rows] == uris
    assert held.count == listing.count == 6 and held.tally() == listing.tally()
    assert held.summary.snapshot.hexdigest() == listing.summary.snapshot.hexdigest()
    from vision_ops.tally import bucket_of

    assert held.in_buckets({bucket_of(uris[4])}) == [uris[4]]
    assert held_listing(spec, plan_inputs(spec, s3_options), most=5) is None
    assert held_listing(spec, plan_inputs(spec, s3_options), most=6) is not None  # 9 named


def test_a_prefix_named_with_a_slash_is_listed_beside_an_object_of_its_name(
    ray_local, s3fs_client, s3_options
) -> None:
    """`s3://images/clash/` while an object `clash` exists: the prefix is listed (the object
    of the folder's name took its place); a bucket that does not exist is named."""
    s3fs_client.pipe("images/clash", b"an object with the folder's name")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
    s3fs_client.pipe("images/clash/inside.png", buffer.getvalue())
    rows, listing = listing_of(InputSpec(uris=["s3://images/clash/"]), s3_options)
    assert [row["source_uri"] for row in rows] == ["s3://images/clash/inside.png"]
    assert listing.count == 1
    with pytest.raises(SourceError, match=r"^input s3://no-such-bucket-here/x/: not found"):
        listing_of(InputSpec(uris=["s3://no-such-bucket-here/x/"]), s3_options)


def test_a_bad_manifest_fails_before_any_work(
    ray_local, tmp_path, s3fs_client, s3_options, tiny_weights
) -> None:
    no_uri = put_parquet(
        s3fs_client, "images/lists/no-uri.parquet", pa.table({"name": ["a.png"], "size": [1]})
    )
    output = tmp_path / "table"
    with pytest.raises(SourceError) as err:
        run_job(job_spec(no_uri, str(output), tiny_weights, s3_options))
    assert str(err.value) == (
        f"manifest {no_uri}: entry 0 has no URI; expected a `uri` column or `bucket` + `key` "
        "columns, found columns ['name', 'size']"
    )
    assert not output.exists()  # no lock, no staging: nothing was started
    late = (
        "uri,size\n" + "".join(f"s3://b/{i}.png,{i}\n" for i in range(3000)) + "s3://b/x.png,9kB\n"
    )
    s3fs_client.pipe("images/lists/late.csv", late.encode())
    with pytest.raises(SourceError) as err:
        run_job(job_spec("s3://images/lists/late.csv", str(output), tiny_weights, s3_options))
    assert str(err.value) == (
        "manifest s3://images/lists/late.csv: an entry (s3://b/x.png): invalid literal for int() "
        "with base 10: '9kB'"
    )
    assert not output.exists()


def job_spec(manifest: str | None, output: str, weights: Path, options: Any, **inputs: Any):  # type: ignore[no-untyped-def]
    raw = {
        "input": {"manifest": manifest, **inputs} if manifest else inputs,
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(weights),
            "num_classes": 4,
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 2, "read_batch_size": 2, "max_actors": 1},
        "output": {"uri": output, "rows_per_file": 4},
        "run": {"id": "streamed", "date": "2026-11-24"},
        "storage_options": options,
    }
    return parse_spec(raw)


def test_a_run_from_a_streamed_manifest_equals_a_listed_run(
    ray_local, tmp_path, s3fs_client, s3_options, streamed_objects, tiny_weights
) -> None:
    uris = sorted(streamed_objects)
    manifest = put_parquet(
        s3fs_client,
        "images/lists/run.parquet",
        inventory(streamed_objects, [*reversed(uris), uris[2]]),  # shuffled, one twice
    )
    streamed = run_job(job_spec(manifest, str(tmp_path / "m"), tiny_weights, s3_options))
    listed = run_job(
        job_spec(None, str(tmp_path / "l"), tiny_weights, s3_options, uris=[f"s3://{PREFIX}/"])
    )
    assert streamed.inputs == listed.inputs == streamed.commit.rows == 6
    keep = ["item_id", "source_uri", "source_etag", "source_size", "status", "label_id"]
    tables = [pq.read_table(tmp_path / name / "run_date=2026-11-24") for name in ("m", "l")]
    rows = [t.select(keep).sort_by("item_id").to_pylist() for t in tables]
    assert rows[0] == rows[1]
    assert sorted(r["source_uri"] for r in rows[0]) == uris  # each URI once
    np.testing.assert_allclose(
        *[t.sort_by("item_id")["score"].to_numpy() for t in tables], atol=1e-6
    )
    manifests = [committed_runs(str(tmp_path / name))[0] for name in ("m", "l")]
    assert manifests[0]["input_snapshot_digest"] == manifests[1]["input_snapshot_digest"]
    assert manifests[0]["units_digest"] == manifests[1]["units_digest"]
    assert {r["status"] for r in rows[0]} == {"ok"}
    assert dt.date.fromisoformat(manifests[0]["run_date"]) == dt.date(2026, 11, 24)


INVENTORY_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"


def inventory_csv_rows(objects: dict[str, dict[str, Any]]) -> list[list[str]]:
    """S3 Inventory CSV rows of a versioned bucket (in INVENTORY_SCHEMA's order): an older
    version of the first object (first: were it read, it would be the one kept), each object's
    current version, and a deleted key's marker; keys URL-encoded, as S3 Inventory writes them."""
    first = sorted(objects)[0]
    bucket, key = first.split("/")[2], first.split("/", 3)[3]
    modified = objects[first]["LastModified"].isoformat()
    rows = [[bucket, quote_plus(key), "v1", "false", "false", "9", modified, "0old"]]
    for uri in sorted(objects):
        info, encoded = objects[uri], quote_plus(uri.split("/", 3)[3])
        identity = [str(info["size"]), info["LastModified"].isoformat(), info["ETag"].strip('"')]
        rows.append([bucket, encoded, "v2", "true", "false", *identity])
    rows.append([bucket, quote_plus(f"{PREFIX}/gone.png"), "v3", "true", "true", "", modified, ""])
    return rows


def put_report(fs: Any, folder: str, file_format: str, data_files: dict[str, bytes]) -> str:
    """An S3 Inventory report: its data files and the manifest.json naming them."""
    for name, data in data_files.items():
        fs.pipe(f"{folder}/data/{name}", data)
    manifest = {
        "sourceBucket": "images",
        "destinationBucket": "arn:aws:s3:::" + folder.split("/")[0],
        "version": "2016-11-30",
        "fileFormat": file_format,
        "fileSchema": INVENTORY_SCHEMA if file_format == "CSV" else "message s3.inventory {}",
        "files": [
            {"key": f"{folder.split('/', 1)[1]}/data/{name}", "size": len(data)}
            for name, data in data_files.items()
        ],
    }
    fs.pipe(f"{folder}/manifest.json", json.dumps(manifest).encode())
    return f"s3://{folder}/manifest.json"


def test_an_s3_inventory_report_is_read_through_its_manifest_json(
    ray_local, s3fs_client, s3_options, streamed_objects
) -> None:
    """Gzipped CSV data files without a header, their columns named by the manifest.json's
    fileSchema (so a versioned bucket's older versions and delete markers are left out and each
    object keeps its size and ETag), or Parquet data files: the listing a prefix gives. A data
    file with no rows is none of the listing's."""
    rows = inventory_csv_rows(streamed_objects)
    text = ["\n".join(",".join(f'"{v}"' for v in row) for row in part) + "\n"
            for part in (rows[:4], rows[4:])]  # fmt: skip
    text.insert(0, "")  # a data file with no rows, first: the report's check reads it
    csv_report = put_report(
        s3fs_client,
        "out/inventory/images/daily/2026-12-03T01-00Z",
        "CSV",
        {f"part{i}.csv.gz": gzip.compress(part.encode()) for i, part in enumerate(text)},
    )
    names = [column_name(field) for field in INVENTORY_SCHEMA.split(",")]
    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(names)}).set_column(
        names.index("key"), "key", pa.array([unquote_plus(row[1]) for row in rows])
    )
    parquet_report = put_report(
        s3fs_client,
        "out/inventory/images/parquet/2026-12-03T01-00Z",
        "Parquet",
        {
            "part0.parquet": parquet_bytes(table.slice(0, 0)),
            "part1.parquet": parquet_bytes(table.slice(0, 5)),
            "part2.parquet": parquet_bytes(table.slice(5)),
        },
    )
    from_prefix, _ = listing_of(InputSpec(uris=[f"s3://{PREFIX}/"]), s3_options)
    assert [row["source_uri"] for row in from_prefix] == sorted(streamed_objects)
    for report in (csv_report, parquet_report):
        streamed, listing = listing_of(InputSpec(manifest=report), s3_options)
        assert streamed == from_prefix, report
        assert listing.count == 6
        assert (
            sorted(read_manifest(report, s3_options), key=lambda r: r["source_uri"]) == from_prefix
        )


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"fileFormat": "ORC"}, "fileFormat 'ORC': expected one of ['CSV', 'Parquet'] (configure"),
        ({"fileFormat": "CSV", "files": []}, "a CSV report without a fileSchema"),
        (
            {"fileFormat": "CSV", "fileSchema": "Key, Size"},
            "fileSchema 'Key, Size': expected Bucket and Key among its fields",
        ),
        (
            {"fileFormat": "Parquet", "destinationBucket": "out"},
            "destinationBucket 'out': expected a bucket ARN (arn:aws:s3:::BUCKET)",
        ),
        (
            {"fileFormat": "Parquet", "destinationBucket": "arn:aws:s3:::out", "files": []},
            "the report lists no data files: no inputs",
        ),
        (
            {
                "fileFormat": "CSV",
                "fileSchema": INVENTORY_SCHEMA,
                "destinationBucket": "arn:aws:s3:::out",
                "files": [{"key": "inventory/none/data/missing.csv.gz"}],
            },
            "its data file s3://out/inventory/none/data/missing.csv.gz: not found",
        ),
        ([1, 2], "expected an S3 Inventory manifest.json (a JSON object)"),
    ],
)
def test_an_inventory_manifest_that_cannot_be_read_is_named(
    s3fs_client, s3_options, manifest: Any, message: str
) -> None:
    path = f"out/inventory/bad-{uuid.uuid4().hex[:8]}/manifest.json"
    s3fs_client.pipe(path, json.dumps(manifest).encode())
    for read in (read_manifest, lambda uri, options: plan_inputs(InputSpec(manifest=uri), options)):
        with pytest.raises(SourceError) as err:
            read(f"s3://{path}", s3_options)
        assert str(err.value).startswith(f"manifest s3://{path}: {message}")


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b'"images","a.png"\n' * 50)[:-30], "cannot read: "),  # cut short
        (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "cannot read: "),  # a corrupt stream
        (gzip.compress(b'"images"\n'), "entry 0"),  # a row short of its key
    ],
)
def test_an_inventory_data_file_that_cannot_be_read_is_named(
    s3fs_client, s3_options, data: bytes, message: str
) -> None:
    folder = f"out/inventory/broken-{uuid.uuid4().hex[:8]}"
    report = put_report(s3fs_client, folder, "CSV", {"part0.csv.gz": data})
    for read in (read_manifest, lambda uri, options: plan_inputs(InputSpec(manifest=uri), options)):
        with pytest.raises(SourceError) as err:
            read(report, s3_options)
        assert str(err.value).startswith(f"manifest {report}: {message}"), str(err.value)


def test_a_data_file_the_listing_cannot_parse_fails_it_in_one_line(
    ray_local, s3fs_client, s3_options
) -> None:
    """A row past the check's first rows that Arrow cannot parse (a column too many) fails the
    listing, before any work, with the manifest and the data file named and Arrow's own words:
    not the Ray task's traceback that carries them."""
    good = '"images","a.png","v1","true","false","9","2026-12-03T01:00:00.000Z","e"\n'
    folder = f"out/inventory/unparsed-{uuid.uuid4().hex[:8]}"
    report = put_report(
        s3fs_client,
        folder,
        "CSV",
        {
            "part0.csv.gz": gzip.compress(good.encode()),
            "part1.csv.gz": gzip.compress((good[:-1] + ',"extra"\n').encode()),
        },
    )
    with pytest.raises(SourceError) as err:
        listing_of(InputSpec(manifest=report), s3_options)
    data_file = f"{folder}/data/part1.csv.gz"
    expected = (  # Arrow numbers the row where it knows the row's place in the file
        rf"manifest {re.escape(report)}: cannot read: ArrowInvalid: {re.escape(data_file)}: "
        rf"CSV parse error: (Row #1: )?Expected 8 columns, got 9: {re.escape(good[:-1])},\"extra\""
    )
    assert re.fullmatch(expected, str(err.value)), str(err.value)


def test_run_on_a_manifest_the_listing_cannot_parse_prints_no_traceback(tmp_path: Path) -> None:
    """The command line in a process (and local cluster) of its own, on a CSV manifest whose
    row past the checked first 64 KB has a column too many: exit 2 with the one-line error,
    and none of the stack trace Ray Data logs as the listing's dataset aborts (its log file
    keeps it)."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from ray_temp_root import short_temp_dir

    from vision_ops.errors import EXIT_BAD_SPEC

    good = [f"file:///images/{index:05d}.png,e{index}" for index in range(4000)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(["uri,etag", *good, "file:///images/bad.png,e,extra"]) + "\n")
    spec = {
        "input": {"manifest": str(manifest)},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:lose_device",  # any model: the run fails at its listing
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "output": {"uri": str(tmp_path / "table")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_temp = short_temp_dir("vom")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_temp)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vision_ops.cli", "run", str(path)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = [log.read_text() for log in ray_temp.rglob("logs/ray-data/ray-data.log")]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == EXIT_BAD_SPEC, done.stderr[-3000:]
    assert len(logs) == 1 and "Traceback" in logs[0] and "CSV parse error" in logs[0]
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith(
        f"error: manifest {manifest}: cannot read: ArrowInvalid: {manifest}: CSV parse error: "
    ), said
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr, done.stderr[-3000:]
    assert "An exception was raised from a task of operator" in done.stderr  # Ray's line stays
