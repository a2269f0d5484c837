"""Listing inputs: directories, globs, files and manifests, local and memory://, with identity."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from vision_ops.config import InputSpec
from vision_ops.sources import (
    LISTING_SCHEMA,
    FolderWalk,
    SourceError,
    check_manifest,
    has_extension,
    list_inputs,
    object_listing,
    paged_listing,
    plan_inputs,
    read_manifest,
    undecodable_name,
)

# Local test tree: relative path -> size in bytes. Each file gets its own fixed mtime.
TREE = {
    "photos/a.jpg": 3,
    "photos/notes.txt": 2,
    "photos/sub/B.JPG": 5,
    "photos/sub/d.tif": 11,
    "photos/sub/deeper/c.png": 7,
    "photos/sub/deeper/e.jpeg": 13,
}
BASE_MTIME = 1_700_000_000.25  # exactly representable, so microseconds compare exactly
IMAGES = sorted(name for name in TREE if not name.endswith(".txt"))


def mtime_of(relative: str) -> dt.datetime:
    seconds = BASE_MTIME + sorted(TREE).index(relative) * 60
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The TREE files under tmp_path, seeded content, fixed mtimes."""
    for index, (relative, size) in enumerate(sorted(TREE.items())):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((index + offset) % 256 for offset in range(size)))
        seconds = mtime_of(relative).timestamp()
        os.utime(path, (seconds, seconds))
    return tmp_path


@pytest.fixture
def memfs() -> Iterator[fsspec.AbstractFileSystem]:
    """The process-wide memory:// filesystem, empty before and after the test."""

    def clear() -> None:
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs.clear()
        MemoryFileSystem.pseudo_dirs.append("")

    clear()
    yield fsspec.filesystem("memory")
    clear()


def local_row(root: Path, relative: str) -> dict[str, Any]:
    return {
        "source_uri": f"file://{root / relative}",
        "source_etag": None,
        "source_size": TREE[relative],
        "source_mtime": mtime_of(relative),
    }


def listing(spec: InputSpec) -> list[dict[str, Any]]:
    table = list_inputs(spec)
    assert table.schema == LISTING_SCHEMA
    return table.to_pylist()


def uris(spec: InputSpec) -> list[str]:
    return [row["source_uri"] for row in listing(spec)]


# --- local files ---------------------------------------------------------------------------------


def test_directory_is_listed_recursively_with_identity(tree: Path) -> None:
    rows = listing(InputSpec(uris=[str(tree / "photos")]))
    assert rows == [local_row(tree, relative) for relative in IMAGES]


def test_listing_schema_is_the_declared_one(tree: Path) -> None:
    table = list_inputs(InputSpec(uris=[str(tree / "photos")]))
    assert table.schema == LISTING_SCHEMA
    assert table.schema.field("source_uri").nullable is False
    assert table.schema.field("source_mtime").type == pa.timestamp("us", tz="UTC")
    assert table.column("source_size").to_pylist() == [TREE[name] for name in IMAGES]


SPELLINGS = ["plain", "file-url", "trailing-slash", "dot-dot", "dot", "file-url-dot-dot"]


@pytest.mark.parametrize("form", SPELLINGS)
def test_directory_spellings_give_the_same_uris(tree: Path, form: str) -> None:
    directory = str(tree / "photos")
    uri = {
        "plain": directory,
        "file-url": f"file://{directory}",
        "trailing-slash": directory + "/",
        "dot-dot": f"{tree}/photos/sub/../../photos",
        "dot": f"{tree}/./photos/.",
        "file-url-dot-dot": f"file://{tree}/photos/sub/..",
    }
    assert uris(InputSpec(uris=[uri[form]])) == [f"file://{tree / name}" for name in IMAGES]


def test_a_file_and_glob_named_through_dot_dot_give_the_plain_uri(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree / "photos/sub")
    assert uris(InputSpec(uris=["../a.jpg"])) == [f"file://{tree}/photos/a.jpg"]
    assert uris(InputSpec(uris=["../**/*.png"])) == [f"file://{tree}/photos/sub/deeper/c.png"]
    both = InputSpec(uris=["../a.jpg", str(tree / "photos/a.jpg")])
    assert uris(both) == [f"file://{tree}/photos/a.jpg"]  # one input, named twice
    (walk,) = plan_inputs(InputSpec(uris=["deeper/../deeper"])).listings  # a run's paged walk
    assert pa.concat_tables(walk.pages())["source_uri"].to_pylist() == [
        f"file://{tree}/photos/sub/deeper/{name}" for name in ("c.png", "e.jpeg")
    ]


def test_relative_path_becomes_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert uris(InputSpec(uris=["photos/sub/deeper"])) == [
        f"file://{tree}/photos/sub/deeper/c.png",
        f"file://{tree}/photos/sub/deeper/e.jpeg",
    ]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("photos/**/*.png", ["photos/sub/deeper/c.png"]),
        ("photos/**/*.JPG", ["photos/sub/B.JPG"]),
        ("photos/*.jpg", ["photos/a.jpg"]),
        ("photos/sub/*", ["photos/sub/B.JPG", "photos/sub/d.tif"]),
        ("photos/**", IMAGES),
        ("photos/sub/deeper/?.*", ["photos/sub/deeper/c.png", "photos/sub/deeper/e.jpeg"]),
        ("photos/[ab]*", ["photos/a.jpg"]),
    ],
)
def test_globs(tree: Path, pattern: str, expected: list[str]) -> None:
    rows = listing(InputSpec(uris=[str(tree / pattern)]))
    assert rows == [local_row(tree, name) for name in expected]


def test_single_file(tree: Path) -> None:
    rows = listing(InputSpec(uris=[str(tree / "photos/sub/d.tif")]))
    assert rows == [local_row(tree, "photos/sub/d.tif")]


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        (["jpg"], ["photos/a.jpg", "photos/sub/B.JPG"]),
        ([".JPG"], ["photos/a.jpg", "photos/sub/B.JPG"]),
        (["png", ".Tif"], ["photos/sub/d.tif", "photos/sub/deeper/c.png"]),
        ([], sorted(TREE)),
    ],
)
def test_extension_filter_is_case_insensitive(
    tree: Path, extensions: list[str], expected: list[str]
) -> None:
    spec = InputSpec(uris=[str(tree / "photos")], extensions=extensions)
    assert uris(spec) == [f"file://{tree / name}" for name in expected]


def test_a_file_named_twice_is_listed_once(tree: Path) -> None:
    spec = InputSpec(
        uris=[
            str(tree / "photos/a.jpg"),
            str(tree / "photos"),
            f"file://{tree}/photos/a.jpg",
            str(tree / "photos/**/*.jpg"),
        ]
    )
    assert listing(spec) == [local_row(tree, name) for name in IMAGES]


def test_output_is_sorted_whatever_the_order_named(tree: Path) -> None:
    spec = InputSpec(
        uris=[
            str(tree / "photos/sub/deeper/e.jpeg"),
            str(tree / "photos/sub/B.JPG"),
            str(tree / "photos/a.jpg"),
        ]
    )
    assert uris(spec) == sorted(uris(spec))
    assert uris(spec) == [
        f"file://{tree}/photos/a.jpg",
        f"file://{tree}/photos/sub/B.JPG",
        f"file://{tree}/photos/sub/deeper/e.jpeg",
    ]


def test_missing_path_is_named(tree: Path) -> None:
    missing = str(tree / "photos/nope")
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(uris=[str(tree / "photos"), missing]))
    assert str(caught.value) == f"input {missing}: not found"


@pytest.mark.parametrize("name", ["photos/notes.txt", "photos/**/*.gif", "empty"])
def test_nothing_found(tree: Path, name: str) -> None:
    (tree / "empty").mkdir()
    uri = str(tree / name)
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(uris=[uri]))
    assert str(caught.value) == (
        f"no input files found in {uri} (looked for: .bmp .gif .jpeg .jpg .png .tif .tiff .webp)"
    )


def test_nothing_found_with_any_extension(tree: Path) -> None:
    (tree / "empty").mkdir()
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(uris=[str(tree / "empty")], extensions=[]))
    assert (
        str(caught.value) == f"no input files found in {tree / 'empty'} (looked for: any extension)"
    )


@pytest.mark.parametrize(
    ("uri", "extensions", "kept"),
    [
        ("s3://b/x.JPG", [".jpg"], True),
        ("s3://b/x.jpg", [".png"], False),
        ("s3://b/x.jpeg", [".jpg"], False),
        ("s3://b/x", [".jpg"], False),
        ("s3://b/x", [], True),
        ("s3://b/dir.jpg/x", [".jpg"], False),
        ("file:///tmp/scene.tar.gz", [".gz"], True),
        ("memory:///a/.jpg", [".jpg"], False),
        ("s3://pacs/ct/scan0001", ["", ".dcm"], True),
        ("s3://pacs/ct/1.2.840.113619.2.55.3", ["", ".dcm"], True),  # named by its UID
        ("s3://pacs/ct/1.2.840.113619.2.55.3", [".dcm"], False),
        ("s3://pacs/ct/notes.txt", ["", ".dcm"], False),
        ("https://cdn.example/x.jpg?v=2", [".jpg"], True),  # an http query is not the name's
        ("HTTPS://cdn.example/x.jpg#top", [".jpg"], True),
        ("s3://b/x.jpg?v=2", [".jpg"], False),  # an S3 key may hold a ?: it is the name's
    ],
)
def test_has_extension(uri: str, extensions: list[str], kept: bool) -> None:
    assert has_extension(uri, extensions) is kept


def test_links_to_files_are_listed_and_links_to_folders_named(
    tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of symbolic links (a DVC cache, a shared pool): a link to a file is listed
    with its target's size and time, a link that leads nowhere as itself (its read gives an
    error row), and a link to a folder is named in a warning, not followed."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "a.jpg").symlink_to(tree / "photos" / "a.jpg")
    (links / "gone.png").symlink_to(tmp_path / "nothing-here.png")
    (links / "sub").symlink_to(tree / "photos" / "sub", target_is_directory=True)
    for spec in (InputSpec(uris=[str(links)]), InputSpec(uris=[f"{links}/*"])):
        caplog.clear()
        rows = listing(spec)
        assert [(row["source_uri"], row["source_size"]) for row in rows[:1]] == [
            (f"file://{links}/a.jpg", TREE["photos/a.jpg"])
        ]
        assert rows[0]["source_mtime"] == mtime_of("photos/a.jpg")
        assert [row["source_uri"] for row in rows] == [
            f"file://{links}/a.jpg",
            f"file://{links}/gone.png",
        ]
        assert f"{links}/sub: a link to a folder, not followed (name it as an input)" in (
            caplog.text
        )


def test_a_folder_that_cannot_be_listed_is_named(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filesystem refuses to list one folder (access denied; as root here, injected): the
    listing fails naming it, instead of leaving it out (fsspec's walk omits what it cannot
    list), for a folder and for a glob."""
    listed = LocalFileSystem.ls

    def ls(self: Any, path: str, detail: bool = False, **kwargs: Any) -> Any:
        if path.rstrip("/").endswith("/deeper"):
            raise PermissionError(f"access denied: {path}")
        return listed(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    for uri in (str(tree / "photos"), f"{tree}/photos/**/*.png"):
        with pytest.raises(
            SourceError, match=r"a folder under it cannot be listed \(access denied"
        ):
            list_inputs(InputSpec(uris=[uri]))


# --- memory:// -----------------------------------------------------------------------------------


def test_memory_directory_glob_and_file(memfs: fsspec.AbstractFileSystem) -> None:
    memfs.pipe("/bucket/x/1.png", b"1234")
    memfs.pipe("/bucket/x/y/2.JPG", b"12")
    memfs.pipe("/bucket/x/y/z/3.txt", b"123")
    memfs.pipe("/bucket/other/4.png", b"12345")
    rows = listing(InputSpec(uris=["memory://bucket/x"]))
    assert [(row["source_uri"], row["source_size"]) for row in rows] == [
        ("memory:///bucket/x/1.png", 4),
        ("memory:///bucket/x/y/2.JPG", 2),
    ]
    assert all(isinstance(row["source_mtime"], dt.datetime) for row in rows)
    assert all(row["source_mtime"].utcoffset() == dt.timedelta(0) for row in rows)
    assert uris(InputSpec(uris=["memory://bucket/**/*.png"])) == [
        "memory:///bucket/other/4.png",
        "memory:///bucket/x/1.png",
    ]
    assert uris(InputSpec(uris=["memory://bucket/x/y/2.JPG", "memory://bucket/x/y"])) == [
        "memory:///bucket/x/y/2.JPG"
    ]


def test_memory_missing_path(memfs: fsspec.AbstractFileSystem) -> None:
    memfs.pipe("/bucket/x/1.png", b"1")
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(uris=["memory://bucket/y"]))
    assert str(caught.value) == "input memory://bucket/y: not found"


# --- manifests -----------------------------------------------------------------------------------


def manifest_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = read_manifest(str(path))
    # Every manifest row fits the listing schema.
    assert pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).num_rows == len(rows)
    return rows


def row(
    uri: str, etag: str | None = None, size: int | None = None, mtime: dt.datetime | None = None
) -> dict[str, Any]:
    return {"source_uri": uri, "source_etag": etag, "source_size": size, "source_mtime": mtime}


def test_text_manifest_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "inputs.txt"
    path.write_text(
        "\ufeff# images for the nightly run\n"
        "s3://images/a.jpg\n"
        "\n"
        "   \n"
        "  s3://images/b c.png  \n"
        "# s3://images/commented-out.jpg\n"
        "/data/local.tif\n"
    )
    assert manifest_rows(path) == [
        row("s3://images/a.jpg"),
        row("s3://images/b c.png"),
        row("file:///data/local.tif"),
    ]


def test_csv_manifest_with_uri_header(tmp_path: Path) -> None:
    path = tmp_path / "inputs.csv"
    path.write_text(
        "URI,Size,ETag,Last_Modified\n"
        's3://images/a.jpg,10,"""0a1b""",2024-05-01T12:00:00Z\n'
        "s3://images/b.jpg,,,\n"
    )
    assert manifest_rows(path) == [
        row(
            "s3://images/a.jpg",
            etag="0a1b",
            size=10,
            mtime=dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc),
        ),
        row("s3://images/b.jpg"),
    ]


def test_csv_manifest_with_bucket_key_header(tmp_path: Path) -> None:
    path = tmp_path / "inventory.csv"
    path.write_text("bucket,key,size,e_tag\nimages,2024/a.jpg,12,e1\nimages,2024/b.png,0,e2\n")
    assert manifest_rows(path) == [
        row("s3://images/2024/a.jpg", etag="e1", size=12),
        row("s3://images/2024/b.png", etag="e2", size=0),
    ]


def test_headerless_s3_inventory_csv_decodes_keys(tmp_path: Path) -> None:
    path = tmp_path / "inventory.csv"
    path.write_text(
        '"images","my%20photo.jpg","123","2024-05-01T12:00:00.000Z","0a1b"\n'
        '"images","dir%2Fsub/x+y%2B1.png","7","2024-05-01T12:00:00.000Z","0a1c"\n'
    )
    assert manifest_rows(path) == [
        row("s3://images/my photo.jpg"),
        row("s3://images/dir/sub/x y+1.png"),
    ]


def test_parquet_s3_inventory(tmp_path: Path) -> None:
    path = tmp_path / "inventory.parquet"
    modified = [
        dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 5, 2, 8, 30, tzinfo=dt.timezone.utc),
    ]
    table = pa.table(
        {
            "bucket": ["images", "images"],
            "key": ["2024/my photo.jpg", "2024/b.png"],
            "size": pa.array([1234, 56], pa.int64()),
            "last_modified_date": pa.array(modified, pa.timestamp("ms", tz="UTC")),
            "e_tag": ["d41d8cd98f00b204e9800998ecf8427e", "0a1b"],
            "storage_class": ["STANDARD", "GLACIER"],
        }
    )
    pq.write_table(table, path)
    assert manifest_rows(path) == [
        row("s3://images/2024/my photo.jpg", "d41d8cd98f00b204e9800998ecf8427e", 1234, modified[0]),
        row("s3://images/2024/b.png", "0a1b", 56, modified[1]),
    ]


def test_parquet_manifest_with_uri_column(tmp_path: Path) -> None:
    path = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"uri": ["gs://b/a.jpg", "az://c/b.png"]}), path)
    assert manifest_rows(path) == [row("gs://b/a.jpg"), row("az://c/b.png")]


def test_a_parquet_manifests_binary_text_and_epoch_times_are_read_as_written(
    tmp_path: Path,
) -> None:
    """URIs in a `binary` column (was `b's3://b/a.jpg'`, its row then dropped as `.jpg'`), and
    epoch times in any unit, as an S3 Inventory or a Spark export writes them (nanoseconds
    escaped as an OSError; 0 was read as no time)."""
    path = tmp_path / "inputs.parquet"
    second = 1_700_000_000
    times = [second, second * 1_000, second * 1_000_000, second * 1_000_000_000, 0]
    uris = [f"s3://b/{index}.jpg".encode() for index in range(len(times))]
    pq.write_table(pa.table({"uri": pa.array(uris, pa.binary()), "mtime": times}), path)
    at = dt.datetime.fromtimestamp(second, dt.timezone.utc)
    epoch = dt.datetime.fromtimestamp(0, dt.timezone.utc)
    expected = [row(f"s3://b/{i}.jpg", mtime=at) for i in range(4)] + [
        row("s3://b/4.jpg", mtime=epoch)
    ]
    assert manifest_rows(path) == expected
    read = check_manifest(str(path), [".jpg"])
    assert read.normalise(pq.read_table(path)).to_pylist() == expected
    for bad in (1e30, float("nan")):  # nan: ran past the units (a StopIteration)
        pq.write_table(pa.table({"uri": ["s3://b/a.jpg"], "mtime": [bad]}), path)
        with pytest.raises(SourceError) as refused:
            check_manifest(str(path), [".jpg"])
        assert str(refused.value).endswith(f"entry 0 (s3://b/a.jpg): time {bad!r}: expected an "
                                           "epoch time or ISO 8601")  # fmt: skip


def test_a_manifest_entry_naming_an_unknown_protocol_is_refused_up_front(tmp_path: Path) -> None:
    """One mistyped `s4://` would fail, at read time, every image read beside it."""
    path = tmp_path / "inputs.txt"
    path.write_text("s3://b/a.jpg\ns4://b/b.jpg\n")
    with pytest.raises(SourceError) as refused:
        check_manifest(str(path), [])
    assert str(refused.value) == (
        f"manifest {path}: entry 1 (s4://b/b.jpg): unknown protocol s4://; expected s3://, "
        "gs://, az://, https://, a path ..."
    )
    streamed = tmp_path / "inputs.csv"
    streamed.write_text("uri\ns3://b/a.jpg\n")
    with pytest.raises(SourceError, match=r"an entry \(s4://b/late.jpg\): unknown protocol s4"):
        check_manifest(str(streamed), []).normalise(pa.table({"uri": ["s4://b/late.jpg"]}))


@pytest.mark.parametrize(
    ("name", "write", "columns"),
    [
        ("inputs.csv", lambda p: p.write_text("name,size\nx.jpg,1\n"), "['name', 'size']"),
        (
            "inputs.parquet",
            lambda p: pq.write_table(pa.table({"file": ["x.jpg"], "e_tag": ["e"]}), p),
            "['e_tag', 'file']",
        ),
        (
            "inputs.parquet",
            lambda p: pq.write_table(pa.table({"bucket": ["images"], "size": [1]}), p),
            "['bucket', 'size']",
        ),
    ],
)
def test_manifest_without_uri_column_names_the_columns(
    tmp_path: Path, name: str, write: Any, columns: str
) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(SourceError) as caught:
        read_manifest(str(path))
    assert str(caught.value) == (
        f"manifest {path}: entry 0 has no URI; expected a `uri` column or `bucket` + `key` "
        f"columns, found columns {columns}"
    )


def test_manifest_not_found(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(manifest=missing))
    assert str(caught.value) == f"manifest {missing}: not found"
    folder = tmp_path / "lists.txt"
    folder.mkdir()
    for read in (read_manifest, lambda uri: check_manifest(uri, [])):
        with pytest.raises(SourceError) as caught:
            read(str(folder))
        assert str(caught.value) == (
            f"manifest {folder}: a folder; expected a file (a URI a line, CSV, Parquet, or an "
            "S3 Inventory manifest.json)"
        )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.parquet", b"not parquet at all", "cannot read: "),
        ("bad.txt", b"\xff\xfe\x81 not utf-8", "cannot read: "),
        ("bad.csv", b"uri,size\ns3://b/a.jpg,12kB\n", "entry 0 (s3://b/a.jpg): invalid literal"),
        ("bad-date.csv", b"uri,mtime\ns3://b/a.jpg,yesterday\n", "entry 0 (s3://b/a.jpg): "),
    ],
)
def test_unreadable_manifest_is_a_source_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SourceError) as caught:
        read_manifest(str(path))
    assert str(caught.value).startswith(f"manifest {path}: {message}")


def test_empty_manifest_finds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert read_manifest(str(path)) == []
    with pytest.raises(SourceError) as caught:
        list_inputs(InputSpec(manifest=str(path)))
    assert str(caught.value).startswith(f"no input files found in {path} (looked for: ")


def test_memory_manifest(memfs: fsspec.AbstractFileSystem) -> None:
    memfs.pipe("/lists/inputs.csv", b"bucket,key\nimages,a.jpg\nimages,b.gif\n")
    assert read_manifest("memory://lists/inputs.csv") == [
        row("s3://images/a.jpg"),
        row("s3://images/b.gif"),
    ]


def test_manifest_and_uris_merge_filtered_and_deduplicated(tree: Path) -> None:
    manifest = tree / "inputs.txt"
    manifest.write_text(
        f"{tree}/photos/a.jpg\n{tree}/photos/notes.txt\ns3://images/z.png\ns3://images/y.bin\n"
    )
    rows = listing(InputSpec(uris=[str(tree / "photos/sub/deeper")], manifest=str(manifest)))
    # The listed file keeps its listing identity; manifest entries keep theirs.
    assert rows == [
        row(f"file://{tree}/photos/a.jpg"),
        local_row(tree, "photos/sub/deeper/c.png"),
        local_row(tree, "photos/sub/deeper/e.jpeg"),
        row("s3://images/z.png"),
    ]


def test_a_uri_listed_and_in_the_manifest_appears_once(tree: Path) -> None:
    manifest = tree / "inputs.txt"
    manifest.write_text(f"{tree}/photos/a.jpg\n{tree}/photos/a.jpg\n")
    rows = listing(InputSpec(uris=[str(tree / "photos/a.jpg")], manifest=str(manifest)))
    assert rows == [local_row(tree, "photos/a.jpg")]


# --- manifests checked up front and read in blocks (as Ray Data's readers hand them over) --------


def streamed_rows(path: Path, extensions: list[str] | None = None) -> list[dict[str, Any]]:
    """The manifest checked, read with the Arrow reader Ray Data uses for its format, and
    normalised block by block (two-row blocks), as a run streams it."""
    read = check_manifest(str(path), extensions if extensions is not None else [])
    if read.format == "parquet":
        table = pq.read_table(path, columns=list(read.columns))
    elif read.format == "csv":
        table = pacsv.read_csv(path, **read.csv_arguments())
    else:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        table = pa.table({"text": lines})
    blocks = [read.normalise(table.slice(i, 2)) for i in range(0, table.num_rows, 2)]
    return pa.concat_tables([LISTING_SCHEMA.empty_table(), *blocks]).to_pylist()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "inputs.txt",
            "\ufeff# nightly\ns3://images/a.jpg\n\n  s3://images/b c.png  \nrel/x.tif\n",
        ),
        (
            "inputs.csv",
            "URI,Size,ETag,Last_Modified\n"
            's3://images/a.jpg,10,"""0a1b""",2024-05-01T12:00:00Z\n'
            "s3://images/b.jpg,,,\nrel/c.png,,,2024-05-01 12:00:00\n",
        ),
        (
            "inventory.csv",
            "bucket,key,size,e_tag\nimages,2024/a.jpg,12,e1\nimages,2024/b.png,0,e2\n",
        ),
        (
            "commented.csv",  # comment lines before the header, as a text manifest allows
            "\ufeff# made by the export job\n\n# 2 images\nuri,size\ns3://images/a.jpg,1\n"
            "s3://images/b.jpg,2\n",
        ),
        (
            "headerless.csv",
            '"images","my%20photo.jpg","123","2024-05-01T12:00:00.000Z","0a1b"\n'
            '"images","dir%2Fsub/x+y%2B1.png","7","2024-05-01T12:00:00.000Z","0a1c"\n',
        ),
    ],
)
def test_a_streamed_text_or_csv_manifest_reads_as_read_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, content: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    expected = read_manifest(str(path))
    assert streamed_rows(path) == expected
    assert len(expected) >= 2 and any(row["source_uri"].startswith("s3://") for row in expected)


def test_a_streamed_parquet_inventory_reads_as_read_manifest(tmp_path: Path) -> None:
    path = tmp_path / "inventory.parquet"
    modified = [dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=dt.timezone.utc)] * 3
    table = pa.table(
        {
            "bucket": ["images"] * 3,
            "key": ["2024/my photo.jpg", "2024/b.png", "2024/notes.txt"],
            "size": pa.array([1234, 56, 7], pa.int64()),
            "last_modified_date": pa.array(modified, pa.timestamp("ms", tz="UTC")),
            "e_tag": ['"d41d8cd98f00b204e9800998ecf8427e"', "0a1b", "0a1c"],
            "storage_class": ["STANDARD", "GLACIER", "STANDARD"],
        }
    )
    pq.write_table(table, path)
    assert check_manifest(str(path), []).columns == (
        "bucket", "key", "size", "last_modified_date", "e_tag"
    )  # fmt: skip
    assert streamed_rows(path, [".jpg", ".png"]) == [
        row("s3://images/2024/my photo.jpg", "d41d8cd98f00b204e9800998ecf8427e", 1234, modified[0]),
        row("s3://images/2024/b.png", "0a1b", 56, modified[0]),
    ]


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        (
            "nouri.parquet",
            lambda p: pq.write_table(pa.table({"file": ["x.jpg"], "e_tag": ["e"]}), p),
            "entry 0 has no URI; expected a `uri` column or `bucket` + `key` columns, "
            "found columns ['e_tag', 'file']",
        ),
        (
            "empty.parquet",
            lambda p: pq.write_table(pa.table({"file": pa.array([], pa.string())}), p),
            "expected a `uri` column or `bucket` + `key` columns, found columns ['file']",
        ),
        (
            "bad.parquet",
            lambda p: p.write_bytes(b"not parquet at all"),
            "cannot read: Parquet magic bytes not found in footer",
        ),
        ("bad.txt", lambda p: p.write_bytes(b"\xff\xfe\x81 not utf-8"), "cannot read: "),
        (
            "bad.csv",
            lambda p: p.write_text("uri,size\ns3://b/a.jpg,12kB\n"),
            "entry 0 (s3://b/a.jpg): invalid literal for int() with base 10: '12kB'",
        ),
        (
            "onecolumn.csv",
            lambda p: p.write_text("s3://b/a.jpg\n"),
            "expected a `uri` column or `bucket` + `key` columns, found columns ['s3://b/a.jpg']",
        ),
    ],
)
def test_a_bad_manifest_is_refused_up_front(
    tmp_path: Path, name: str, write: Any, message: str
) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(SourceError) as caught:
        check_manifest(str(path), [])
    assert str(caught.value).startswith(f"manifest {path}: {message}")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("inputs.txt", "s3://b/a.jpg\nhttps://h/b.jpg?X-Amz-Signature=SECRET\n"),
        ("inputs.csv", "uri,size\ns3://b/a.jpg,1\nhttps://u:SECRET@h/b.jpg,2\n"),
    ],
)
def test_a_manifest_listing_a_uri_with_credentials_is_refused_masked(
    tmp_path: Path, name: str, text: str
) -> None:
    """A listed URI reaches the table's `source_uri` and every error row: one holding a
    password or a signed query is refused, as in a spec, and never echoed."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SourceError) as caught:
        check_manifest(str(path), [])
    assert "SECRET" not in str(caught.value)
    assert str(caught.value).startswith(f"manifest {path}: entry 1 (https://")
    assert "a URI with credentials in it" in str(caught.value)


def test_a_uri_with_credentials_past_the_first_rows_is_refused_when_its_block_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "inputs.csv"
    path.write_text("uri,size\n" + "".join(f"s3://b/{i}.jpg,{i}\n" for i in range(100)))
    read = check_manifest(str(path), [])
    block = pa.table({"uri": ["s3://b/late.jpg", "https://h/x.jpg?sig=SECRET"], "size": ["1", "2"]})
    with pytest.raises(SourceError) as caught:
        read.normalise(block)
    assert str(caught.value) == (
        f"manifest {path}: an entry (https://h/x.jpg?***): a URI with credentials in it (a "
        "password, a token, a signed query); credentials never go in a spec or a command: they "
        "come from the standard chains (environment, profile, instance role)"
    )


def test_a_bad_entry_past_the_first_rows_is_named_when_its_block_is_read(tmp_path: Path) -> None:
    path = tmp_path / "inputs.csv"
    path.write_text("uri,size\n" + "".join(f"s3://b/{i}.jpg,{i}\n" for i in range(100)))
    read = check_manifest(str(path), [])
    block = pa.table({"uri": ["s3://b/late.jpg"], "size": ["12kB"]})
    with pytest.raises(SourceError) as caught:
        read.normalise(block)
    assert str(caught.value) == (
        f"manifest {path}: an entry (s3://b/late.jpg): invalid literal for int() with base 10: "
        "'12kB'"
    )
    with pytest.raises(SourceError, match=r"an entry has no URI; its `uri` cell is empty$"):
        read.normalise(pa.table({"uri": ["", "s3://b/x.jpg"], "size": ["1", "2"]}))
    first_rows = tmp_path / "empty-cell.csv"  # said "expected a `uri` column" beside one
    first_rows.write_text("uri,extra\ns3://b/a.jpg,1\n,2\n")
    with pytest.raises(SourceError, match=r"entry 1 has no URI; its `uri` cell is empty$"):
        check_manifest(str(first_rows), [])
    first_rows.write_text("uri,bucket,key\n,b,\n")  # only the empty cells are named
    with pytest.raises(SourceError, match=r"entry 0 has no URI; its `uri` and `key` cell is"):
        check_manifest(str(first_rows), [])


def test_an_http_input_that_cannot_be_reached_is_not_called_missing(tmp_path: Path) -> None:
    """fsspec's http raises FileNotFoundError for a refused connection as for a 404: the first
    now says the server was not reached (it said "not found"), the second still "not found",
    and a file the server has is listed."""
    import functools
    import socket
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "there.jpg").write_bytes(b"x")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        listed = list_inputs(InputSpec(uris=[f"{base}/there.jpg"]))
        assert listed["source_uri"].to_pylist() == [f"{base}/there.jpg"]
        with pytest.raises(SourceError, match=r"^input .*/missing.jpg: not found$"):
            list_inputs(InputSpec(uris=[f"{base}/missing.jpg"]))
    finally:
        server.shutdown()
    with pytest.raises(SourceError) as unreachable:
        list_inputs(InputSpec(uris=[f"http://127.0.0.1:{closed}/a.jpg"]))
    assert str(unreachable.value).startswith(
        f"input http://127.0.0.1:{closed}/a.jpg: cannot be reached (ClientConnectorError: "
    )


def test_a_file_whose_name_holds_glob_characters_is_listed_as_named(tmp_path: Path) -> None:
    """`img[1].jpg` is a file's name where there is one (it was read as the pattern
    `img1.jpg`, matching nothing: the file was lost without a word); a pattern still globs."""
    for name in ("img[1].jpg", "what?.jpg", "a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    named = [str(tmp_path / "img[1].jpg"), str(tmp_path / "what?.jpg")]
    listed = list_inputs(InputSpec(uris=named, extensions=[".jpg"]))
    assert sorted(listed["source_uri"].to_pylist()) == sorted(f"file://{p}" for p in named)
    pattern = list_inputs(InputSpec(uris=[str(tmp_path / "[ab].jpg")], extensions=[".jpg"]))
    assert sorted(pattern["source_uri"].to_pylist()) == [
        f"file://{tmp_path}/a.jpg",
        f"file://{tmp_path}/b.jpg",
    ]


def test_a_file_whose_name_is_not_utf8_is_listed_percent_encoded(tmp_path: Path) -> None:
    """A Latin-1 name (`caf\\xe9.jpg`) among UTF-8 ones: Arrow refused it, and with it the
    whole listing (UnicodeEncodeError, exit 1). Now it is listed with that byte %-encoded, by
    the listing a run walks as by `list_inputs`; the reader makes it an error row naming it,
    while a file whose UTF-8 name holds the same %-text is an ordinary file."""
    (tmp_path / "photos").mkdir()
    for name in (b"caf\xe9.jpg", b"lit%E9.jpg", b"r\xe9f%41.jpg", "\u00e9t\u00e9.jpg".encode()):
        (tmp_path / "photos" / os.fsdecode(name)).write_bytes(b"x")
    expected = [
        f"file://{tmp_path}/photos/caf%E9.jpg",
        f"file://{tmp_path}/photos/lit%E9.jpg",
        f"file://{tmp_path}/photos/r%E9f%2541.jpg",  # its own % escaped: it comes back whole
        f"file://{tmp_path}/photos/\u00e9t\u00e9.jpg",
    ]
    spec = InputSpec(uris=[str(tmp_path / "photos")])
    assert list_inputs(spec)["source_uri"].to_pylist() == expected
    (walk,) = plan_inputs(spec).listings
    assert sorted(pa.concat_tables(walk.blocks())["source_uri"].to_pylist()) == expected
    found = {uri: undecodable_name(uri) for uri in expected}
    assert [str(err) if err else None for err in found.values()] == [
        f"{expected[0]}: the file's name is not UTF-8 (shown with those bytes %-encoded), so no "
        "table can name it: not read; rename it in UTF-8 and rerun",
        None,
        f"{expected[2]}: the file's name is not UTF-8 (shown with those bytes %-encoded), so no "
        "table can name it: not read; rename it in UTF-8 and rerun",
        None,
    ]
    assert undecodable_name(f"file://{tmp_path}/photos/gone%E9.jpg") is None  # no such file


def test_plan_inputs_walks_a_local_directory_a_folder_at_a_time(tree: Path) -> None:
    spec = InputSpec(uris=[str(tree / "photos/sub"), str(tree / "photos/a.jpg")])
    plan = plan_inputs(spec)
    assert plan.table.to_pylist() == [local_row(tree, "photos/a.jpg")]  # the single file
    (walk,) = plan.listings
    assert isinstance(walk, FolderWalk) and plan.parts == 2
    pages = [page["source_uri"].to_pylist() for page in walk.pages()]
    assert sorted(map(len, pages)) == [2, 2]  # sub/ (B.JPG, d.tif), sub/deeper/ (c.png, e.jpeg)
    walked = pa.concat_tables(walk.blocks(rows=3)).to_pylist()
    assert (
        sorted(walked, key=lambda r: r["source_uri"])
        == list_inputs(InputSpec(uris=[str(tree / "photos/sub")])).to_pylist()
    )
    only_jpeg = paged_listing(str(tree / "photos"), [".jpeg"], None)
    assert only_jpeg is not None and [b.num_rows for b in only_jpeg.blocks()] == [1]
    assert paged_listing(str(tree / "photos/*.jpg"), [".jpg"], None) is None  # listed at once
    with pytest.raises(SourceError, match="not found"):
        plan_inputs(InputSpec(uris=[str(tree / "nope")]))
    with pytest.raises(SourceError, match="no input files found"):
        plan_inputs(InputSpec(uris=[str(tree / "photos/notes.txt")]))


# --- s3:// prefixes and globs, a page at a time --------------------------------------------------


@pytest.fixture(scope="module")
def paged_bucket(s3fs_client: Any) -> str:
    """50 JPEGs and a note under images/paged/, in two folders."""
    objects = {f"images/paged/{i // 25}/{i:03d}.jpg": bytes(i + 1) for i in range(50)}
    s3fs_client.pipe(objects | {"images/paged/0/notes.txt": b"not an image"})
    return "images/paged"


def listed_rows(fs: Any, found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [
        {
            "source_uri": f"s3://{name}",
            "source_etag": info["ETag"].strip('"'),
            "source_size": info["size"],
            "source_mtime": info["LastModified"],
        }
        for name, info in sorted(found.items())
        if name.endswith(".jpg")
    ]
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).to_pylist()


@pytest.mark.s3
def test_a_prefix_is_listed_a_page_at_a_time(
    s3fs_client: Any, s3_options: Any, paged_bucket: str
) -> None:
    listing = object_listing(f"s3://{paged_bucket}/", [".jpg"], s3_options)
    assert listing is not None and listing.prefix == "paged/"
    pages = replace(listing, page_keys=10).pages()
    first = next(pages)
    assert first["source_uri"].to_pylist() == [
        f"s3://{paged_bucket}/0/{i:03d}.jpg" for i in range(10)
    ]
    rest = list(pages)
    assert len(rest) >= 4  # 51 keys, 10 a page: six pages in all
    rows = pa.concat_tables([first, *rest]).to_pylist()
    assert rows == listed_rows(s3fs_client, s3fs_client.find(paged_bucket, detail=True))
    blocks = [b.num_rows for b in replace(listing, page_keys=10).blocks(rows=20)]
    assert blocks == [20, 29, 1]  # pages of 10, 10, 9 (and the note), 10, 10, 1 jpg


@pytest.mark.s3
@pytest.mark.parametrize("pattern", ["paged/**/*.jpg", "paged/1/*", "paged/*/0[0-2]?.jpg"])
def test_an_s3_glob_is_listed_a_page_at_a_time(
    s3fs_client: Any, s3_options: Any, paged_bucket: str, pattern: str
) -> None:
    uri = f"s3://images/{pattern}"
    listing = object_listing(uri, [".jpg"], s3_options)
    assert listing is not None and listing.pattern is not None
    rows = pa.concat_tables(list(replace(listing, page_keys=7).pages())).to_pylist()
    expected = listed_rows(s3fs_client, s3fs_client.glob(f"images/{pattern}", detail=True))
    assert rows == expected and len(expected) >= 3


@pytest.mark.s3
def test_a_single_object_or_another_store_is_not_paged(s3_options: Any, paged_bucket: str) -> None:
    assert object_listing(f"s3://{paged_bucket}/0/000.jpg", [".jpg"], s3_options) is None
    assert object_listing("memory://bucket/x", [".jpg"], s3_options) is None
    with pytest.raises(SourceError, match="not found"):
        object_listing(f"s3://{paged_bucket}/nope/", [".jpg"], s3_options)


def test_an_inventory_of_a_versioned_bucket_lists_each_keys_current_version(
    tmp_path: Path,
) -> None:
    """S3 Inventory with versions: a key's older versions and its delete markers are not
    inputs (a deleted key is none), read up front or streamed, Parquet or CSV."""
    inventory = pa.table(
        {
            "bucket": ["b"] * 5,
            "key": ["a.jpg", "a.jpg", "gone.jpg", "gone.jpg", "c.jpg"],
            "version_id": ["2", "1", "4", "3", "5"],
            "is_latest": [True, False, True, False, True],
            "is_delete_marker": [False, False, True, False, False],
            "size": pa.array([20, 10, None, 30, 50], pa.int64()),
        }
    )
    pq.write_table(inventory, tmp_path / "inventory.parquet")
    pacsv.write_csv(inventory, tmp_path / "inventory.csv")
    expected = [("s3://b/a.jpg", 20), ("s3://b/c.jpg", 50)]
    for path in (tmp_path / "inventory.parquet", tmp_path / "inventory.csv"):
        for rows in (manifest_rows(path), streamed_rows(path)):
            assert [(r["source_uri"], r["source_size"]) for r in rows] == expected, path


def test_a_glob_lists_only_the_folders_its_pattern_reaches(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[str] = []
    ls = LocalFileSystem.ls

    def recording(self: Any, path: str, detail: bool = False, **kwargs: Any) -> Any:
        listed.append(path.rstrip("/").removeprefix(str(tree)))
        return ls(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", recording)
    assert uris(InputSpec(uris=[f"{tree}/photos/*.jpg"])) == [f"file://{tree}/photos/a.jpg"]
    assert listed == ["/photos"]
    listed.clear()
    assert uris(InputSpec(uris=[f"{tree}/photos/*/*.tif"])) == [f"file://{tree}/photos/sub/d.tif"]
    assert listed == ["/photos", "/photos/sub"]
    listed.clear()
    assert len(uris(InputSpec(uris=[f"{tree}/photos/**/*.png"]))) == 1
    assert listed == ["/photos", "/photos/sub", "/photos/sub/deeper"]


def test_an_s3_input_or_output_without_credentials_is_named_with_where_they_were_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore finds no credentials anywhere: the input (or output) is named and where they
    were looked for, as a SourceError (exit 2) before any work; it was "NoCredentialsError:
    Unable to locate credentials", exit 1."""
    from vision_ops.storage import StorageError, require_bucket

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"s3": {"endpoint_url": "http://127.0.0.1:9"}}
    looked = "no credentials for the store: none found in the environment (AWS_ACCESS_KEY_ID"
    with pytest.raises(SourceError, match=rf"^input s3://photos/p/: {re.escape(looked)}"):
        plan_inputs(InputSpec(uris=["s3://photos/p/"]), options)
    with pytest.raises(StorageError, match=rf"^output s3://out/t: {re.escape(looked)}"):
        require_bucket("s3://out/t", options)
