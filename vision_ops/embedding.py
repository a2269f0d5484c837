"""Embeddings: the column of L2-normalised feature vectors, its rows, and the nearest-neighbour
and near-duplicate SQL over them (DuckDB; an HNSW index from the vss extension for large tables).

The column is `embedding fixed_size_list<float32>[D]`, D the model's feature size (the input
of the head the predictor removes, vision_ops.embedding_predictor). An error row's vector is D
NaNs, not null: Arrow C++ before apache/arrow#50271 (pyarrow < 26) cannot read a null
fixed-size list back from Parquet (GH-35692), and the sink reads its part files back. Every
query here reads `status = 'ok'` rows only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.schema import (
    _ok_mask,
    _table,
    _unit_columns,
    declared_schema,
    latest_row_sql,
    task_of,
    with_stage_times,
)
from vision_ops.storage import recorded_uri

TASK = "embedding"
EMBEDDING_COLUMN = "embedding"
# The predictor's batch column: float32 (N, D), one L2-normalised vector a row.
VECTORS = "embedding_vectors"
# Neighbour queries build an HNSW index (DuckDB vss) over the candidate vectors when there are
# at least this many: building it costs more than one exact scan (a 1280-d float32 vector is
# 5 KB: 200k of them are 1 GB to read), and pays back over several queries of one table.
HNSW_MIN_ROWS = 200_000


class BadSearch(VisionOpsError, ValueError):
    """A --similar-to or --duplicates argument outside what it can be (exit 2)."""

    exit_code = EXIT_BAD_SPEC


class NoSuchUnit(LookupError):
    """A --similar-to that names no embedded unit of the table."""


def embedding_field(dim: int | None = None) -> pa.Field:
    """The vector column: fixed_size_list<float32>[dim]; a list of any length where the
    model (so D) is not known yet (the task's declared fields)."""
    return pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim if dim else -1))


EMBEDDING_FIELDS = (embedding_field(),)


def sized_fields(dim: int) -> tuple[pa.Field, ...]:
    """The task's columns for a model of `dim` features."""
    if dim <= 0:
        raise ValueError(f"embedding: expected a positive feature size, found {dim}")
    return (embedding_field(dim),)


def embedding_dim(schema: pa.Schema) -> int | None:
    """D of a table's vector column (None: not sized)."""
    kind = schema.field(EMBEDDING_COLUMN).type
    return int(kind.list_size) if pa.types.is_fixed_size_list(kind) else None


def embedding_table(
    batch: dict[str, np.ndarray],
    run_id: str,
    labels: list[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Embedder output (a float32 (N, D) array) -> rows: the unit columns and the vector, D
    NaNs where the unit failed (see the module docstring)."""
    rows = len(batch["source_uri"])
    vectors = np.asarray(batch[VECTORS], dtype=np.float32).reshape(rows, -1)
    dim = vectors.shape[1]
    schema = schema or declared_schema(TASK, sized_fields(dim))
    declared = embedding_dim(schema)
    if declared is not None and declared != dim:
        raise ValueError(
            f"embedding: the table declares {declared} values per vector, the model gave {dim}"
        )
    vectors = np.where(_ok_mask(batch)[:, None], vectors, np.float32(np.nan))
    columns = _unit_columns(batch, run_id, task_of(schema), schema)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    columns[EMBEDDING_COLUMN] = column.cast(schema.field(EMBEDDING_COLUMN).type)
    return with_stage_times(_table(columns, schema, rows), batch)


# --- SQL over the `predictions` view (vision_ops.query.register_views) -------------------------


def vectors_sql(source: str = "predictions", dated: bool = True) -> str:
    """Each unit's latest ok vector per model (a unit embedded by several runs counts once):
    the latest run is the one of the latest `run_date`, then the greatest run id (`night-10`
    after `night-9` by date; a view without `run_date`, `dated=False`, orders by run id alone).
    DuckDB reads Parquet's fixed-size lists as lists (FLOAT[]); each model's vectors are cast
    to FLOAT[D] when searched (`candidates`): a table may hold runs of models of other sizes."""
    latest = latest_row_sql("item_id, model_weights_sha256", dated)
    return f"""
        SELECT item_id, source_uri, frame_index, tile_x, tile_y, run_id, model_name,
               model_weights_sha256, embedding
        FROM {source}
        WHERE status = 'ok'{latest}
    """


def load_vectors(connection: Any, source: str = "predictions") -> None:
    """Materialise the vectors to compare as the temporary table `vectors`; ValueError if the
    table is not an embedding table or has no ok rows."""
    columns = {row[0] for row in connection.execute(f"DESCRIBE {source}").fetchall()}
    if EMBEDDING_COLUMN not in columns:
        raise ValueError(
            f"expected an embedding table (task.kind {TASK}, an `{EMBEDDING_COLUMN}` column), "
            f"found columns {', '.join(sorted(columns))}"
        )
    vectors = vectors_sql(source, dated="run_date" in columns)
    connection.execute(f"CREATE OR REPLACE TEMP TABLE vectors AS {vectors}")
    found = connection.execute("SELECT count(*) FROM vectors").fetchone()
    if not found or found[0] == 0:
        raise ValueError("the table has no ok embedding rows to compare")


def similar(
    connection: Any,
    targets: list[str],
    k: int = 10,
    hnsw_min_rows: int = HNSW_MIN_ROWS,
) -> Any:
    """The k nearest units (cosine similarity, largest first) of each unit whose source URI or
    item id is in `targets`, among the units embedded by the same model (itself left out). A
    DuckDB relation: the query unit (query_source_uri, query_item_id, query_frame_index,
    query_tile_x, query_tile_y: a scene's URI, or a multi-frame instance's, names each of its
    units, each with its own k), then rank, similarity, source_uri, item_id, frame_index,
    tile_x, tile_y. From `hnsw_min_rows` candidates the search goes through an HNSW index."""
    if k <= 0:
        raise BadSearch(f"-k: expected a positive number of neighbours, found {k}")
    load_vectors(connection)
    names = {target: {target, recorded_uri(target)} for target in targets}  # a path as run
    queries = connection.execute(
        "SELECT item_id, source_uri, model_weights_sha256, embedding FROM vectors "
        "WHERE source_uri IN (SELECT unnest($names)) OR item_id IN (SELECT unnest($names)) "
        "ORDER BY source_uri, item_id",
        {"names": sorted({name for named in names.values() for name in named})},
    ).fetchall()
    known = {q[0] for q in queries} | {q[1] for q in queries}
    missing = {target for target, named in names.items() if not named & known}
    if missing:
        raise NoSuchUnit(
            f"--similar-to {sorted(missing)[0]}: expected the source URI or item id of an "
            "embedded unit (status ok) of this table, found none"
        )
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE neighbours (query_source_uri VARCHAR, query_item_id "
        "VARCHAR, model VARCHAR, rank INTEGER, item_id VARCHAR, similarity FLOAT)"
    )
    for model in sorted({q[2] for q in queries}):
        dim, _ = index_candidates(connection, model, hnsw_min_rows)
        for item, uri, query_model, vector in queries:
            if query_model == model:
                found = nearest(connection, dim, vector, k + 1)
                others = [row for row in found if row[0] != item][:k]
                connection.executemany(
                    "INSERT INTO neighbours VALUES (?, ?, ?, ?, ?, ?)",
                    [(uri, item, model, rank, *row) for rank, row in enumerate(others, 1)],
                )
    return connection.sql(
        "SELECT n.query_source_uri, n.query_item_id, q.frame_index AS query_frame_index, "
        "q.tile_x AS query_tile_x, q.tile_y AS query_tile_y, n.rank, "
        "round(n.similarity, 6) AS similarity, v.source_uri, v.item_id, v.frame_index, "
        "v.tile_x, v.tile_y FROM neighbours n "
        "JOIN vectors v ON v.item_id = n.item_id AND v.model_weights_sha256 = n.model "
        "JOIN vectors q ON q.item_id = n.query_item_id AND q.model_weights_sha256 = n.model "
        "ORDER BY n.query_source_uri, q.frame_index, q.tile_y, q.tile_x, n.query_item_id, n.rank"
    )


def index_candidates(
    connection: Any, model: str, hnsw_min_rows: int = HNSW_MIN_ROWS
) -> tuple[int, int]:
    """One model's vectors as the temporary table `candidates` (embedding FLOAT[D]), with an
    HNSW index (cosine) when it holds at least `hnsw_min_rows`; returns D and the row count."""
    found = connection.execute(
        "SELECT max(len(embedding)), count(*) FROM vectors WHERE model_weights_sha256 = $model",
        {"model": model},
    ).fetchone()
    dim, rows = (int(found[0] or 0), int(found[1])) if found else (0, 0)
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE candidates AS SELECT item_id, "
        f"CAST(embedding AS FLOAT[{dim}]) AS embedding FROM vectors "
        "WHERE model_weights_sha256 = $model",
        {"model": model},
    )
    if rows >= hnsw_min_rows:
        load_vss(connection)
        # a temporary table is in memory: no experimental index persistence involved
        connection.execute(
            "CREATE INDEX candidates_hnsw ON candidates USING HNSW (embedding) "
            "WITH (metric = 'cosine')"
        )
    return dim, rows


def nearest_sql(dim: int, k: int) -> str:
    """The k `candidates` nearest to the vector $vector, by cosine distance: the shape an
    HNSW index on `embedding` answers (ORDER BY array_cosine_distance ... LIMIT k)."""
    return f"""
        SELECT item_id, array_cosine_similarity(embedding, $vector::FLOAT[{dim}]) AS similarity
        FROM candidates
        ORDER BY array_cosine_distance(embedding, $vector::FLOAT[{dim}])
        LIMIT {int(k)}
    """


def nearest(connection: Any, dim: int, vector: Any, k: int) -> list[tuple[str, float]]:
    """The k (item id, similarity) of `candidates` nearest to `vector`."""
    rows = connection.execute(nearest_sql(dim, k), {"vector": vector}).fetchall()
    return [(str(item), float(score)) for item, score in rows]


def duplicates(
    connection: Any, threshold: float, k: int = 10, hnsw_min_rows: int = HNSW_MIN_ROWS
) -> Any:
    """Pairs of units embedded by the same model whose cosine similarity is at least
    `threshold`, most similar first (source_uri, duplicate_uri, item_id, duplicate_item_id,
    model_name, similarity). Below `hnsw_min_rows` vectors of a model, an exact pairwise
    comparison (O(units^2)); from there each unit's `k` nearest through an HNSW index, so a
    unit's pairs are found among its k nearest (approximately)."""
    if not -1.0 <= threshold <= 1.0:
        raise BadSearch(f"--duplicates: expected a cosine similarity in [-1, 1], found {threshold}")
    if k <= 0:
        raise BadSearch(f"-k: expected a positive number of neighbours, found {k}")
    load_vectors(connection)
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE pairs (item_id VARCHAR, duplicate_item_id VARCHAR, "
        "model VARCHAR, similarity FLOAT)"
    )
    models = connection.execute(
        "SELECT DISTINCT model_weights_sha256 FROM vectors ORDER BY 1"
    ).fetchall()
    for (model,) in models:
        dim, rows = index_candidates(connection, model, hnsw_min_rows)
        if rows < hnsw_min_rows:
            connection.execute(exact_pairs_sql(threshold), {"model": model})
        else:
            _indexed_pairs(connection, model, dim, threshold, k)
    return connection.sql(
        "SELECT a.source_uri, b.source_uri AS duplicate_uri, p.item_id, p.duplicate_item_id, "
        "a.model_name, round(p.similarity, 6) AS similarity FROM pairs p "
        "JOIN vectors a ON a.item_id = p.item_id AND a.model_weights_sha256 = p.model "
        "JOIN vectors b ON b.item_id = p.duplicate_item_id AND b.model_weights_sha256 = p.model "
        "ORDER BY similarity DESC, a.source_uri, duplicate_uri"
    )


def exact_pairs_sql(threshold: float) -> str:
    """Every pair of `candidates` (model $model's units) at least `threshold` similar, into
    `pairs`."""
    return f"""
        INSERT INTO pairs
        SELECT a.item_id, b.item_id, $model,
               array_cosine_similarity(a.embedding, b.embedding) AS similarity
        FROM candidates a JOIN candidates b ON a.item_id < b.item_id
        WHERE similarity >= {float(threshold)!r}
    """


def _indexed_pairs(connection: Any, model: str, dim: int, threshold: float, k: int) -> None:
    """Each of `candidates` against its k nearest through their HNSW index, into `pairs`."""
    units = connection.execute("SELECT item_id, embedding FROM candidates").to_arrow_table()
    ids = units["item_id"].to_pylist()
    vectors = units["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), dim)
    found: dict[tuple[str, str], float] = {}
    for item, vector in zip(ids, vectors, strict=True):
        for other, score in nearest(connection, dim, vector.tolist(), k + 1):
            if other != item and score >= threshold:
                found[(min(item, other), max(item, other))] = score
    if found:
        connection.executemany(
            "INSERT INTO pairs VALUES (?, ?, ?, ?)",
            [(a, b, model, score) for (a, b), score in found.items()],
        )


def load_vss(connection: Any) -> None:
    """DuckDB vss (HNSW indexes) from its package, offline."""
    from vision_ops.query import _load_packaged_extension

    _load_packaged_extension(connection, "vss", "an HNSW index over embeddings")


# --- the report's summary ------------------------------------------------------------------------

SUMMARY_UNITS = 2000  # units whose nearest-neighbour similarity the report draws


class ComparedUnits(NamedTuple):
    """The units a report compares (`compared_units`) and their cosine similarities, pair by
    pair (`cosine_similarities`): the summary's nearest-neighbour scores and the neighbours
    panel are both drawn from this one matrix, so that a report computes it once."""

    units: pa.Table
    similarity: np.ndarray


def summary_parts(
    table: pa.Table,
) -> tuple[list[tuple[str, float]], np.ndarray, ComparedUnits | None]:
    """Of a run's ok rows: units per model; each compared unit's cosine similarity to its
    nearest other unit (near 1: near-duplicates), clipped to [0, 1]; and the compared units
    (`compared_units`), which the report's neighbours panel draws too."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    names = ok["model_name"].to_pylist()
    per_model = sorted(
        ((name, float(names.count(name))) for name in set(names)), key=lambda p: (-p[1], p[0])
    )
    compared = compared_units(ok)
    if compared is None:
        return per_model, np.zeros(0, dtype=np.float32), None
    return per_model, np.clip(compared.similarity.max(axis=1), 0.0, 1.0), compared


def compared_units(table: pa.Table) -> ComparedUnits | None:
    """The first SUMMARY_UNITS ok units of the run's most used model (a unit is compared with
    its own model's units alone) and their cosine similarities; None where there are fewer
    than two."""
    from vision_ops.tasks import counts  # here: tasks imports this module

    ok = table.filter(pc.equal(table["status"], "ok"))
    if ok.num_rows < 2:
        return None
    model = counts(ok["model_weights_sha256"])[0][0]
    units = ok.filter(pc.equal(ok["model_weights_sha256"], model)).slice(0, SUMMARY_UNITS)
    if units.num_rows < 2:
        return None
    return ComparedUnits(units, cosine_similarities(units[EMBEDDING_COLUMN]))


def cosine_similarities(vectors: pa.ChunkedArray) -> np.ndarray:
    """The cosine similarities of L2-normalised vectors of one length, pair by pair (n, n),
    each one's with itself set to -inf (a unit is not its own neighbour)."""
    stacked = vectors.combine_chunks().flatten().to_numpy().astype(np.float32)
    stacked = stacked.reshape(len(vectors), -1)
    similarity = stacked @ stacked.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity
