"""Embeddings in pieces: head removal per architecture family (and refusal where there is
none), the row builder and its Parquet round trip, and the neighbour / duplicate SQL, exact
and through an HNSW index."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vision_ops.config import parse_spec
from vision_ops.embedding import (
    EMBEDDING_COLUMN,
    VECTORS,
    NoSuchUnit,
    duplicates,
    embedding_dim,
    embedding_table,
    index_candidates,
    load_vectors,
    nearest_sql,
    similar,
    sized_fields,
)
from vision_ops.embedding_predictor import HeadNotFound, feature_size, find_head, remove_head
from vision_ops.errors import ModelError
from vision_ops.schema import declared_schema, item_id

# One architecture per head layout (see vision_ops.embedding_predictor), with its feature size.
FAMILIES = {
    "resnet18": 512,  # fc
    "densenet121": 1024,  # classifier: a Linear
    "mobilenet_v3_small": 1024,  # classifier: Sequential, pre-logits kept
    "efficientnet_b0": 1280,  # classifier: Sequential(Dropout, Linear)
    "convnext_tiny": 768,  # classifier: Sequential(LayerNorm2d, Flatten, Linear)
    "vgg11": 4096,  # classifier: fc7
    "vit_b_16": 768,  # heads
    "swin_t": 768,  # head
    "regnet_y_400mf": 440,  # fc; its builder computes with tensors: built on the CPU
}


def torchvision_spec(architecture: str) -> dict[str, object]:
    return {"kind": "torchvision", "architecture": architecture}


def embedding_spec(model: dict[str, object], output: str = "/tmp/unused") -> object:
    return parse_spec(
        {"input": {"uris": ["/tmp"]}, "task": {"kind": "embedding"}, "model": model,
         "output": {"uri": output}}
    )  # fmt: skip


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_feature_size_is_the_heads_input_per_family(architecture):
    spec = embedding_spec(torchvision_spec(architecture))
    assert feature_size(spec.model) == FAMILIES[architecture]


@pytest.mark.parametrize("architecture", ["vit_b_16", "efficientnet_b0", "swin_t"])
def test_a_model_without_its_head_returns_the_features_it_names(architecture):
    """Run, not only measured: ViT's `heads` is a Sequential of a layer named `head`, which
    an index "0" missed (the model still gave 1,000 logits)."""
    import torchvision

    model = getattr(torchvision.models, architecture)(weights=None).eval()
    assert remove_head(model) == FAMILIES[architecture]
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, FAMILIES[architecture])


def test_a_headless_model_gives_its_pooled_features():
    """resnet18 without `fc` returns exactly its average-pooled last feature map."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        trunk = torch.nn.Sequential(*list(model.children())[:-1])
        expected = trunk(images).flatten(1)
        assert remove_head(model) == 512
        assert isinstance(model.fc, torch.nn.Identity)
        np.testing.assert_allclose(model(images).numpy(), expected.numpy(), rtol=1e-5)


def test_efficientnet_lite0_head_is_fc():
    from vision_ops.zoo import efficientnet_lite0

    model = efficientnet_lite0(pretrained=False)
    parent, name, linear = find_head(model)
    assert (parent is model, name, linear.in_features) == (True, "_fc", 1280)


def test_a_model_whose_head_cannot_be_found_is_refused():
    spec = embedding_spec(torchvision_spec("squeezenet1_0"))
    with pytest.raises(HeadNotFound, match=r"SqueezeNet.classifier: expected .* nn.Linear.*"
                       r"found Sequential ending in AdaptiveAvgPool2d"):  # fmt: skip
        feature_size(spec.model)
    headless = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(HeadNotFound, match=r"no classification head found; expected a final "
                       r"nn.Linear at one of fc, classifier, heads, head, _fc"):  # fmt: skip
        find_head(headless)


def test_a_torchscript_model_is_refused():
    spec = embedding_spec({"kind": "torchscript", "uri": "/tmp/model.pt"})
    with pytest.raises(ModelError, match="embedding needs a torchvision or entrypoint model"):
        feature_size(spec.model)


# --- rows ------------------------------------------------------------------------------------


def batch_of(vectors: np.ndarray, status: list[str], uris: list[str]) -> dict[str, np.ndarray]:
    rows = len(status)
    return {
        "source_uri": np.array(uris, dtype=object),
        "item_id": np.array([item_id(uri) for uri in uris], dtype=object),
        "status": np.array(status, dtype=object),
        "error_type": np.array([None if s == "ok" else "CorruptImage" for s in status], object),
        "error_message": np.array([None if s == "ok" else "bad" for s in status], object),
        "model_name": np.full(rows, "toy", dtype=object),
        "model_weights_sha256": np.full(rows, "a" * 64, dtype=object),
        VECTORS: vectors.astype(np.float32),
    }


def unit_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_rows_hold_fixed_size_vectors_and_error_rows_nan(tmp_path):
    vectors = unit_vectors(3, 4)
    schema = declared_schema("embedding", sized_fields(4))
    batch = batch_of(vectors, ["ok", "error", "ok"], ["s3://b/a.png", "s3://b/x.png", "s3://b/c"])
    table = embedding_table(batch, "run-1", schema=schema)
    assert table.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 4)
    assert embedding_dim(table.schema) == 4
    assert table["task"].to_pylist() == ["embedding"] * 3
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")  # a null fixed-size list could not be read
    assert back.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 4)
    stored = np.array(back[EMBEDDING_COLUMN].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(stored[[0, 2]], vectors[[0, 2]])
    assert np.isnan(stored[1]).all()
    assert back["status"].to_pylist() == ["ok", "error", "ok"]


def test_rows_refuse_vectors_of_another_size():
    schema = declared_schema("embedding", sized_fields(8))
    batch = batch_of(unit_vectors(2, 4), ["ok", "ok"], ["a", "b"])
    with pytest.raises(ValueError, match="declares 8 values per vector, the model gave 4"):
        embedding_table(batch, "run-1", schema=schema)


# --- SQL -------------------------------------------------------------------------------------


@pytest.fixture
def table_of_vectors(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, np.ndarray]:
    """40 unit vectors in 16-d (item i: s3://b/i.png), #7 a near-copy of #3, and an error row;
    the view `predictions` over their Parquet."""
    vectors = unit_vectors(41, 16, seed=1)
    vectors[7] = vectors[3] + 0.01
    vectors[7] /= np.linalg.norm(vectors[7])
    status = ["ok"] * 40 + ["error"]
    uris = [f"s3://b/{i}.png" for i in range(41)]
    return predictions_view(tmp_path, vectors, status, uris), vectors


def predictions_view(
    tmp_path: Path, vectors: np.ndarray, status: list[str], uris: list[str]
) -> duckdb.DuckDBPyConnection:
    """A connection whose view `predictions` reads the embedding rows of `vectors` (one run)."""
    schema = declared_schema("embedding", sized_fields(vectors.shape[1]))
    table = embedding_table(batch_of(vectors, status, uris), "run-1", schema=schema)
    pq.write_table(table, tmp_path / "rows.parquet")
    connection = duckdb.connect()
    connection.execute(
        f"CREATE VIEW predictions AS SELECT * FROM read_parquet('{tmp_path / 'rows.parquet'}')"
    )
    return connection


def expected_neighbours(vectors: np.ndarray, query: int, k: int) -> list[tuple[str, float]]:
    similarity = vectors[:40] @ vectors[query]
    order = [i for i in np.argsort(-similarity, kind="stable") if i != query][:k]
    return [(f"s3://b/{i}.png", float(similarity[i])) for i in order]


@pytest.mark.parametrize("hnsw_min_rows", [1_000_000, 1], ids=["exact", "hnsw"])
def test_similar_returns_the_nearest_units_by_cosine(table_of_vectors, hnsw_min_rows):
    connection, vectors = table_of_vectors
    result = similar(connection, ["s3://b/3.png"], k=5, hnsw_min_rows=hnsw_min_rows)
    rows = result.fetchall()
    columns = result.columns
    assert columns == ["query_source_uri", "query_item_id", "query_frame_index", "query_tile_x",
                       "query_tile_y", "rank", "similarity", "source_uri", "item_id",
                       "frame_index", "tile_x", "tile_y"]  # fmt: skip
    rows = [(r[0], r[5], r[6], r[7], *r[8:]) for r in rows]  # the query unit's columns apart
    found = [(r[3], r[2]) for r in rows]
    expected = expected_neighbours(vectors, 3, 5)
    assert [uri for uri, _ in found] == [uri for uri, _ in expected]
    assert found[0][0] == "s3://b/7.png" and found[0][1] > 0.99  # the near-copy first
    np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)
    assert [r[1] for r in rows] == [1, 2, 3, 4, 5]
    assert {r[0] for r in rows} == {"s3://b/3.png"}


def test_over_the_threshold_the_search_uses_an_hnsw_index(table_of_vectors):
    connection, vectors = table_of_vectors
    load_vectors(connection)
    plans = {}
    for threshold in (1_000_000, 40):
        connection.execute("DROP INDEX IF EXISTS candidates_hnsw")
        dim, rows = index_candidates(connection, "a" * 64, threshold)
        assert (dim, rows) == (16, 40)
        explain = connection.execute(
            f"EXPLAIN {nearest_sql(dim, 3)}", {"vector": vectors[0].tolist()}
        ).fetchall()
        plans[threshold] = explain[0][1]
    assert "HNSW_INDEX_SCAN" not in plans[1_000_000]
    assert "HNSW_INDEX_SCAN" in plans[40]


def test_models_of_other_sizes_are_searched_apart(tmp_path):
    """A table holding runs of two models (D 16 and 8): each unit's neighbours are its own
    model's units."""
    tables = []
    for model, dim in (("a", 16), ("b", 8)):
        batch = batch_of(
            unit_vectors(5, dim, seed=dim), ["ok"] * 5, [f"s3://b/{i}.png" for i in range(5)]
        )
        batch["model_weights_sha256"] = np.full(5, model * 64, dtype=object)
        tables.append(
            embedding_table(
                batch, f"run-{model}", schema=declared_schema("embedding", sized_fields(dim))
            )
        )
        pq.write_table(tables[-1], tmp_path / f"{model}.parquet")
    connection = duckdb.connect()
    connection.execute(
        f"CREATE VIEW predictions AS SELECT * FROM read_parquet('{tmp_path}/*.parquet')"
    )
    rows = similar(connection, ["s3://b/0.png"], k=4).fetchall()
    assert len(rows) == 8 and sorted(r[7] for r in rows) == sorted(
        2 * [f"s3://b/{i}.png" for i in range(1, 5)]
    )
    assert len(duplicates(connection, -1.0).fetchall()) == 2 * 10


def test_a_unit_embedded_by_several_runs_is_searched_by_its_latest_runs_vector(tmp_path):
    """`night-10` (2026-12-02) is later than `night-9` (2026-12-01), though its run id sorts
    first: the unit's vector is night-10's."""
    vectors = unit_vectors(4, 8, seed=3)
    schema = declared_schema("embedding", sized_fields(8))
    uris = [f"s3://b/{i}.png" for i in range(3)]
    old = np.stack([vectors[0], vectors[1], vectors[2]])  # night-9: unit 0 near nothing special
    new = np.stack([vectors[3], vectors[1], vectors[2]])  # night-10: unit 0 is vector 3
    new[1] = vectors[3] + 0.01  # night-10: unit 1 a near-copy of unit 0's new vector
    new[1] /= np.linalg.norm(new[1])
    for run_id, found in (("night-9", old), ("night-10", new)):
        table = embedding_table(batch_of(found, ["ok"] * 3, uris), run_id, schema=schema)
        pq.write_table(table, tmp_path / f"{run_id}.parquet")
    connection = duckdb.connect()
    dates = {"night-9": "2026-12-01", "night-10": "2026-12-02"}
    connection.execute(
        "CREATE VIEW predictions AS "
        + " UNION ALL ".join(
            f"SELECT *, DATE '{date}' AS run_date FROM read_parquet('{tmp_path}/{run_id}.parquet')"
            for run_id, date in dates.items()
        )
    )
    load_vectors(connection)
    latest = connection.execute("SELECT DISTINCT run_id FROM vectors").fetchall()
    assert latest == [("night-10",)]
    rows = similar(connection, ["s3://b/0.png"], k=1).fetchall()
    assert rows[0][7] == "s3://b/1.png" and rows[0][6] > 0.99


def test_an_item_id_names_the_query_unit_too(table_of_vectors):
    connection, _ = table_of_vectors
    rows = similar(connection, [item_id("s3://b/3.png")], k=1).fetchall()
    assert [(r[0], r[7]) for r in rows] == [("s3://b/3.png", "s3://b/7.png")]


def test_a_plain_local_path_names_the_unit_its_run_recorded_as_a_file_uri(tmp_path, monkeypatch):
    """A spec names local inputs as plain paths and the run records them as file:// URIs:
    --similar-to takes the path as the spec wrote it, relative too (it found none)."""
    vectors = unit_vectors(3, 8, seed=2)
    photos = tmp_path / "photos"
    uris = [(photos / f"{i}.png").as_uri() for i in range(3)]
    connection = predictions_view(tmp_path, vectors, ["ok"] * 3, uris)
    monkeypatch.chdir(tmp_path)
    for named in (str(photos / "0.png"), "photos/0.png", "./photos/../photos/0.png", uris[0]):
        rows = similar(connection, [named], k=2).fetchall()
        assert {row[0] for row in rows} == {uris[0]}, named
        assert sorted(row[7] for row in rows) == uris[1:], named
    with pytest.raises(NoSuchUnit, match=r"--similar-to photos/9\.png: expected"):
        similar(connection, ["photos/9.png"])


def test_a_source_of_several_units_gives_each_its_own_neighbours_named(tmp_path):
    """A multi-frame instance's URI (or a scene's) names all its units: each gets its own k,
    and the rows say which unit they are of (query_item_id, query_frame_index); they all read
    as one query before, k rows repeated per unit with nothing to tell them apart."""
    vectors = unit_vectors(6, 8, seed=4)
    uris = ["s3://b/ct.dcm"] * 3 + [f"s3://b/{i}.png" for i in range(3)]
    batch = batch_of(vectors, ["ok"] * 6, uris)
    frames = [0, 1, 2, None, None, None]
    batch["frame_index"] = np.array(frames, dtype=object)
    batch["item_id"] = np.array(
        [item_id(u, f) for u, f in zip(uris, frames, strict=True)], dtype=object
    )
    schema = declared_schema("embedding", sized_fields(8))
    pq.write_table(embedding_table(batch, "run-1", schema=schema), tmp_path / "rows.parquet")
    connection = duckdb.connect()
    connection.execute(
        f"CREATE VIEW predictions AS SELECT * FROM read_parquet('{tmp_path / 'rows.parquet'}')"
    )
    rows = similar(connection, ["s3://b/ct.dcm"], k=2).fetchall()
    assert [(r[1], r[2], r[5]) for r in rows] == [
        (item_id("s3://b/ct.dcm", frame), frame, rank) for frame in (0, 1, 2) for rank in (1, 2)
    ]
    for row in rows:
        assert row[8] != row[1]  # never the query unit itself


def test_similar_to_an_unknown_or_failed_unit_says_so(table_of_vectors):
    connection, _ = table_of_vectors
    with pytest.raises(NoSuchUnit, match=r"--similar-to s3://b/40.png: expected the source URI "
                       r"or item id of an embedded unit"):  # fmt: skip
        similar(connection, ["s3://b/40.png"])  # the error row


def test_duplicates_are_the_pairs_above_the_threshold(table_of_vectors):
    connection, vectors = table_of_vectors
    rows = duplicates(connection, 0.95).fetchall()
    assert [sorted(r[:2]) for r in rows] == [["s3://b/3.png", "s3://b/7.png"]]
    assert rows[0][5] == pytest.approx(float(vectors[3] @ vectors[7]), abs=1e-5)
    everything = duplicates(connection, -1.0).fetchall()
    assert len(everything) == 40 * 39 // 2  # every ok pair once, the error row in none


# --- the CLI ---------------------------------------------------------------------------------


def commit_table(root: Path, table: pa.Table) -> str:
    import datetime as dt

    from vision_ops.sink import ParquetSink

    sink = ParquetSink(str(root), "run-1", dt.date(2026, 11, 24), table.schema)
    sink.write(table)
    sink.commit(table["source_uri"].to_pylist())
    return str(root)


def test_query_similar_to_and_duplicates_from_the_command_line(tmp_path, capsys):
    from vision_ops.cli import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, main

    vectors = unit_vectors(12, 16, seed=2)
    vectors[5] = vectors[2] + 0.01
    vectors[5] /= np.linalg.norm(vectors[5])
    uris = [f"file:///photos/{i}.png" for i in range(12)]
    schema = declared_schema("embedding", sized_fields(16))
    rows = embedding_table(batch_of(vectors, ["ok"] * 12, uris), "run-1", schema=schema)
    root = commit_table(tmp_path / "table", rows)
    similarity = vectors @ vectors[2]
    nearest = [uris[i] for i in np.argsort(-similarity) if i != 2][:2]
    assert nearest[0] == uris[5]
    for index in ("1000", "1"):  # an exact scan, then through the HNSW index
        args = ["query", root, "--similar-to", uris[2], "-k", "2", "--hnsw-min-rows", index]
        assert main([*args, "--format", "csv"]) == EXIT_OK
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split(",")[7] for line in lines[1:]] == nearest
    assert main(["query", root, "--duplicates", "0.95", "--format", "csv"]) == EXIT_OK
    pairs = capsys.readouterr().out.strip().splitlines()[1:]
    assert [sorted(line.split(",")[:2]) for line in pairs] == [[uris[2], uris[5]]]
    both = ["query", root, "--duplicates", "0.9", "--similar-to", uris[0]]
    assert main(both) == EXIT_BAD_SPEC
    assert "expected SQL, --similar-to or --duplicates, found both" in capsys.readouterr().err
    for bad, said in ((["--duplicates", "1.5"], "--duplicates: expected a cosine similarity in "
                       "[-1, 1], found 1.5"), (["--similar-to", uris[0], "-k", "0"], "-k: expected "
                       "a positive number of neighbours, found 0")):  # fmt: skip
        assert main(["query", root, *bad]) == EXIT_BAD_SPEC  # a bad argument, as elsewhere: 2
        assert f"error: {said}" in capsys.readouterr().err
    assert main(["query", root, "--similar-to", "file:///photos/none.png"]) == EXIT_FAILED
    assert "error: --similar-to file:///photos/none.png: expected" in capsys.readouterr().err


def test_duplicates_through_the_index_find_the_exact_pairs(table_of_vectors):
    connection, _ = table_of_vectors
    exact = {tuple(r[2:4]) for r in duplicates(connection, 0.3).fetchall()}
    indexed = duplicates(connection, 0.3, k=39, hnsw_min_rows=1).fetchall()
    assert exact and {tuple(r[2:4]) for r in indexed} == exact
    near = duplicates(connection, 0.95, k=1, hnsw_min_rows=1).fetchall()
    assert [sorted(r[:2]) for r in near] == [["s3://b/3.png", "s3://b/7.png"]]
