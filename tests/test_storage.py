"""`vision_ops.storage`: a process that reads a table and exits at once exits with its own code
(pyarrow's `read_table` on a file object left work running that aborted such a process at exit,
apache/arrow#33975); a URL's user and password found wherever they hide; a local file replaced
whole and flushed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from vision_ops import storage
from vision_ops.storage import (
    holds_credentials,
    masked_credentials,
    masked_url,
    read_parquet,
    userinfo,
    without_userinfo,
)

READ_AND_EXIT = """
import sys
from vision_ops.storage import read_parquet
path, source = sys.argv[1:]
with open(path, "rb") as handle:
    table = read_parquet(handle if source == "file" else handle.read())
sys.exit(3 if table.num_rows == 3 else 1)
"""


def write_table(path: Path) -> pa.Table:
    table = pa.table({"label": ["cat", "dog", None], "score": [0.9, 0.8, 0.1]})
    pq.write_table(table, path)
    return table


def test_read_parquet_reads_a_file_object_or_bytes_whole(tmp_path) -> None:
    written = write_table(tmp_path / "rows.parquet")
    with (tmp_path / "rows.parquet").open("rb") as handle:
        assert read_parquet(handle) == written
    data = (tmp_path / "rows.parquet").read_bytes()
    assert read_parquet(data, ["score"]) == written.select(["score"])


def test_a_process_that_reads_a_table_and_exits_keeps_its_exit_code(tmp_path) -> None:
    """Fresh processes, each reading from a file object or bytes and exiting at once: every one
    exits 3 (with `pq.read_table` on them nearly every one aborted, exit -6, on this machine; a
    threaded `ParquetFile.read` now and then, in CI; an unthreaded but pre-buffered one once in
    CI, which the next test makes certain)."""
    write_table(tmp_path / "rows.parquet")
    for source in ["file", "bytes"] * 4:
        probe = subprocess.run(
            [sys.executable, "-c", READ_AND_EXIT, str(tmp_path / "rows.parquet"), source],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (source, probe.returncode, probe.stderr) == (source, 3, "")


THREADS_AROUND_A_READ = """
import os, sys
from vision_ops.storage import ParquetFile, read_parquet
READS = {
    "read_parquet": lambda handle: read_parquet(handle, ["score"]),
    "first rows": lambda handle: ParquetFile(handle).first_rows(2),
    "footer": lambda handle: ParquetFile(handle).num_rows,
}
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
with open(sys.argv[1], "rb") as handle:
    READS[sys.argv[2]](handle)
print(before, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")
@pytest.mark.parametrize("read", ["read_parquet", "first rows", "footer"])
def test_reading_a_file_object_starts_no_thread_of_arrows(tmp_path, read: str) -> None:
    """What the test above catches only now and then, made certain, for each way the code reads
    a file object (a table's columns; a manifest's first rows; a staged file's footer): with
    `ParquetFile`'s default pre-buffering, reading a table or its first rows from a Python
    file object started a thread of Arrow's IO pool (3 threads became 4), the kind of thread
    that aborted a process at exit in CI (a footer alone started none either way)."""
    write_table(tmp_path / "rows.parquet")
    probe = subprocess.run(
        [sys.executable, "-c", THREADS_AROUND_A_READ, str(tmp_path / "rows.parquet"), read],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, after = map(int, probe.stdout.split())
    assert after == before


@pytest.mark.parametrize(
    ("url", "found", "without"),
    [
        ("http://user:pw@head:8265", "user:pw", "http://head:8265"),
        ("https://u:p/ss@host/path?q=a@b", "u:p/ss", "https://host/path?q=a@b"),  # / in a password
        ("http://u:p@ss@host", "u:p@ss", "http://host"),  # the last @ before the host
        ("http://host:9000/a@b", None, "http://host:9000/a@b"),  # a port, then a key's @
        ("https://cdn:8443/img/logo@2x.png", None, "https://cdn:8443/img/logo@2x.png"),
        ("file://C:/data/logo@2x.png", None, "file://C:/data/logo@2x.png"),  # a drive letter
        ("http://user:1234@host/", "user:1234", "http://host/"),  # digits up to the @: a password
        ("s3://AKIA:wJal/K7@bucket/k", "AKIA:wJal/K7", "s3://bucket/k"),
        ("https://svc:20240101/Xyz@h.example/w.pt", "svc:20240101/Xyz", "https://h.example/w.pt"),
        ("http://host:9000/path?user=a@b", None, "http://host:9000/path?user=a@b"),
        ("s3://bucket/key", None, "s3://bucket/key"),
        ("not a url @ all", None, "not a url @ all"),
    ],
)
def test_a_urls_user_and_password_are_found_wherever_they_hide(
    url: str, found: str | None, without: str
) -> None:
    assert userinfo(url) == found
    assert without_userinfo(url) == without


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://minio:9000/b/alice@x.com/a.png", None),  # a key with an @, behind a port
        ("abfs://container@account.dfs.core.windows.net/x", None),  # a container, not a user
        ("https://h/w.pt#part?sig=1", None),  # a ? inside the fragment is no query
        ("https://h/w.pt?X%2DAmz%2DSignature=SECRET", "https://h/w.pt?***"),  # read decoded
        ("https://h/w.pt?a=1&Sig=SECRET#top", "https://h/w.pt?***"),
        ("https://u:SECRET@h/w.pt", "https://***@h/w.pt"),
        ("gs://AK:SECRET@b/w.pt?X-Goog-Signature=SECRET", "gs://***@b/w.pt?***"),
    ],
)
def test_a_urls_credentials_are_told_from_keys_that_look_like_them(
    url: str, masked: str | None
) -> None:
    assert holds_credentials(url) is (masked is not None)
    assert masked_url(url) == (masked or url)


def test_every_url_in_an_error_has_its_credentials_masked() -> None:
    text = (
        "cannot read https://b.s3.amazonaws.com/w.pt?X-Amz-Credential=AK&X-Amz-Signature=SECRET"
        " (403); tried 's3://AK:SECRET@b/w.pt' and HTTPS://SECRET@h/x, kept"
        " http://minio:9000/b/alice@x.com/a.png"
    )
    assert masked_credentials(text) == (
        "cannot read https://b.s3.amazonaws.com/w.pt?*** (403); tried 's3://***@b/w.pt' and"
        " HTTPS://***@h/x, kept http://minio:9000/b/alice@x.com/a.png"
    )


def test_a_replaced_local_file_flushes_its_bytes_then_its_folder_once_each(
    tmp_path, monkeypatch
) -> None:
    """The temporary's bytes reach the disk before the rename, and the folder after it: no
    other flush (the folder's before the rename is work a journal or manifest write repeats)."""
    flushed: list[str] = []
    real_fsync = os.fsync

    def recorded(descriptor: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    storage.replace_file(LocalFileSystem(), str(target), b"new")

    assert target.read_bytes() == b"new"
    assert [Path(path).parent for path in flushed] == [tmp_path, tmp_path.parent]
    assert Path(flushed[0]).name.startswith("manifest.json") and flushed[0] != str(target)
    assert flushed[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.s3
@pytest.mark.parametrize("asked", [None, True], ids=["default", "a spec asking for the cache"])
def test_a_listing_shows_what_another_process_wrote_since(s3fs_client, s3_options, asked) -> None:
    """A table's manifests, journals and staged parts are listed afresh each time: fsspec keeps
    one filesystem per set of options in a process, and its cached listing hid a run another
    process committed (an incremental run read it as not there, and did its inputs again). A
    spec's storage_options cannot turn the cache back on: the commit path relies on it off."""
    if asked is not None:
        s3_options = {"s3": {**s3_options["s3"], "use_listings_cache": asked}}
    folder = f"images/listing-cache-{asked}/_manifests"
    s3fs_client.pipe({f"{folder}/a.json": b"{}"})
    fs, path = storage.filesystem(f"s3://{folder}", s3_options)
    assert fs.glob(f"{path}/*.json") == [f"{folder}/a.json"]
    s3fs_client.pipe({f"{folder}/b.json": b"{}"})  # another process commits a run
    same, _ = storage.filesystem(f"s3://{folder}", s3_options)
    assert same is fs  # fsspec's instance, kept for the process
    assert same.glob(f"{path}/*.json") == [f"{folder}/a.json", f"{folder}/b.json"]
    assert same.ls(path, detail=False) == [f"{folder}/a.json", f"{folder}/b.json"]


@pytest.mark.s3
def test_missing_on_s3_names_folders_files_and_a_denial_in_the_store_s_words(
    s3fs_client, s3_options, monkeypatch
) -> None:
    """`missing` (one `info` call, where isfile then isdir made two) tells what they told: a
    bucket's root and a prefix with objects under it (no marker object) are folders, a key a
    file; a denial is in the store's words (a HEAD's 403 has none: s3fs says "Forbidden")."""
    s3fs_client.pipe({"images/missing/deep/a.jpg": b"x"})
    assert storage.missing("s3://images", "folder", s3_options) is None
    assert storage.missing("s3://images/missing", "folder", s3_options) is None
    assert storage.missing("s3://images/missing", "file", s3_options) == (
        "is a folder, expected a file"
    )
    assert storage.missing("s3://images/missing/deep/a.jpg", "file", s3_options) is None
    assert storage.missing("s3://images/missing/none.jpg", "file", s3_options) == "not found"
    assert storage.missing("s3://no-such-bucket", "folder", s3_options) == "not found"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    fresh = {"s3": {**s3_options["s3"], "skip_instance_cache": True}}  # signs with the new key
    said = storage.missing("s3://images/missing/deep/a.jpg", "file", fresh)
    assert said is not None and said.startswith("cannot be read: PermissionError: ")
    assert "Forbidden" not in said and "signature" in said
