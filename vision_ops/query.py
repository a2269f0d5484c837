"""DuckDB over the output table, on local paths or s3:// (httpfs shipped in a package, offline)."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from vision_ops.errors import VisionOpsError
from vision_ops.outputs import Target, no_committed_run, sql_source, sql_string
from vision_ops.schema import PARTITION_COLUMN, latest_row_sql
from vision_ops.storage import CREDENTIAL_CHAIN, StorageOptions, without_userinfo
from vision_ops.tasks import BOXES_VIEW, Task, task_of_run


def connect(storage_options: StorageOptions | None = None, table_on_s3: bool = False) -> Any:
    """A DuckDB connection that can read s3:// with the standard AWS credential chain, and
    geometries where DuckDB spatial is installed (the geo extra). NoCredentials where the
    table is on s3:// (or the spec names S3 options) and no credentials are found; where only
    the environment names S3 (an endpoint, a key id), S3 is set up if it can be."""
    try:
        import duckdb
    except ImportError as err:
        raise ImportError("querying needs DuckDB: pip install 'vision-ops[query]'") from err
    connection = duckdb.connect()
    needed = table_on_s3 or bool((storage_options or {}).get("s3"))
    if needed or _endpoint({}) or os.environ.get("AWS_ACCESS_KEY_ID"):
        try:
            enable_s3(connection, storage_options)
        except NoCredentials:
            if needed:
                raise
    with contextlib.suppress(ImportError):
        load_spatial(connection)
    return connection


class NoCredentials(RuntimeError):
    """No AWS credentials anywhere in the chain for a table on s3://."""


def enable_s3(connection: Any, storage_options: StorageOptions | None = None) -> None:
    """httpfs and a DuckDB S3 secret resolved as s3fs (botocore) resolves credentials: the
    environment (with a session token), the shared credentials and config files (AWS_PROFILE,
    AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE), SSO, web identity, container and instance
    roles; the spec's (or AWS_ENDPOINT_URL's) endpoint kept. Nothing of the secret is printed."""
    import duckdb

    s3 = dict((storage_options or {}).get("s3", {}))
    _load_httpfs(connection)
    if not s3.get("anon"):
        _load_packaged_extension(connection, "aws", "the AWS credential chain in DuckDB")
    try:
        connection.execute(_s3_secret_sql(s3))
    except duckdb.Error as err:
        if "Secret Validation Failure" not in str(err):
            raise
        raise NoCredentials(
            f"reading s3:// needs AWS credentials: none found in {CREDENTIAL_CHAIN}"
        ) from None


def table_glob(table_uri: str) -> str:
    """All committed partitions' Parquet files of a table root."""
    return f"{table_uri.rstrip('/')}/{PARTITION_COLUMN}=*/*.parquet"


def read_sql(table_uri: str) -> str:
    """A plain glob of the table's Parquet files (as Athena or Spark read it), as SQL."""
    return f"read_parquet({sql_string(table_glob(table_uri))}, hive_partitioning = true)"


def top_labels_sql(table_uri: str) -> str:
    """Top-1 label and score per image, errors listed with their type."""
    return f"""
        SELECT regexp_extract(source_uri, '[^/]+$') AS image, status,
               coalesce(label, error_type) AS label_or_error, round(score, 3) AS score,
               list_transform(top_k, e -> e.label) AS top_k_labels
        FROM {read_sql(table_uri)}
        ORDER BY image
    """


def boxes_sql(table_uri: str) -> str:
    """One row per detected box, with its image's identity: the detection task's `boxes` view
    (tasks.BOXES_VIEW) over a table root."""
    return f"WITH predictions AS (SELECT * FROM {read_sql(table_uri)}) {BOXES_VIEW}"


class NothingCommitted(VisionOpsError, LookupError):
    """A table with no committed run to read."""


EMPTY_RUNS = "committed_no_rows"  # the relation `predictions` reads where the runs wrote none


def no_rows(task: Task) -> pa.Table:
    """The task's table with no rows, and the partition column a Hive read adds."""
    empty = task.schema.empty_table()
    return empty.append_column(pa.field(PARTITION_COLUMN, pa.date32()), pa.array([], pa.date32()))


def register_views(
    connection: Any,
    table: Target,
    options: StorageOptions | None = None,
    run_id: str | None = None,
    as_of: dt.datetime | None = None,
    task_only: bool = False,
    each_unit_once: bool = False,
) -> Task:
    """Views over a table's committed runs only (what its format's commits made visible):
    `predictions`, one row per unit, and the views its task adds (tasks.py: `boxes` for
    detection, `pixels` for segmentation). `run_id`: that run's rows as it committed them;
    `as_of`: the table at that time (Iceberg); `task_only`: the rows of that task alone (a
    Parquet table may hold runs of another task before); `each_unit_once`: each unit's latest
    row alone (`LATEST_OF_EACH_UNIT`: a table of nightly runs holds a unit once a night, an
    incremental night only what changed). Returns the task, as the run's manifest (the given
    run, else the latest) names it."""
    committed = sql_source(connection, table, options, run_id, as_of)
    source, manifest = committed.relation, committed.run
    if manifest is None:
        raise NothingCommitted(no_committed_run(table, run_id))
    task = task_of_run(manifest)
    if not source:  # committed, with no rows (a quiet incremental night): none to read
        connection.register(EMPTY_RUNS, no_rows(task))
        source = EMPTY_RUNS
    if "'s3://" in source and not _has_s3_secret(connection):
        enable_s3(connection, options)
    where = f" WHERE task = '{task.name}'" if task_only else ""
    where += LATEST_OF_EACH_UNIT if each_unit_once else ""
    connection.execute(f"CREATE OR REPLACE VIEW predictions AS SELECT * FROM {source}{where}")
    # Column name -> type, read once: an Iceberg table's footprint is WKB bytes (Iceberg v2 has
    # no geometry type), a GeoParquet table's a GEOMETRY as DuckDB spatial reads it.
    types = {row[0]: row[1] for row in connection.execute("DESCRIBE predictions").fetchall()}
    if types.get("footprint") == "BLOB" and _spatial_loaded(connection):
        geometry = "SELECT * REPLACE (ST_GeomFromWKB(footprint) AS footprint)"
        connection.execute(f"CREATE OR REPLACE VIEW predictions AS {geometry} FROM {source}{where}")
    columns = list(types)
    for name, select in task.views.items():
        sql = select if isinstance(select, str) else select(columns)
        connection.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    return task


LATEST_OF_EACH_UNIT = latest_row_sql("item_id")  # a unit's row of its latest run


EXPORT_FORMATS = {  # --format: DuckDB's COPY options
    "csv": "FORMAT csv, HEADER true",
    "json": "FORMAT json",
    "parquet": "FORMAT parquet",
}


PARQUET_NEEDS_A_FILE = "--format parquet needs --out FILE"  # (no text to print)


def export(relation: Any, fmt: str, path: str | None) -> str | None:
    """Write a query's result as csv, json or parquet to `path`, or return csv/json text."""
    if path is None and fmt == "parquet":
        raise ValueError(PARQUET_NEEDS_A_FILE)
    if path is not None:
        _copy(relation, fmt, path)
        return None
    with tempfile.TemporaryDirectory(prefix="vision-ops-query-") as folder:
        target = Path(folder) / f"result.{fmt}"
        _copy(relation, fmt, str(target))
        return target.read_text()


def _copy(relation: Any, fmt: str, path: str) -> None:
    copy = f"COPY (SELECT * FROM result) TO {sql_string(path)} ({EXPORT_FORMATS[fmt]})"
    relation.query("result", copy)


def search_sql(connection: Any, task: Task, terms: str) -> str:
    """Full-text search over the `text` of the ok units of the `predictions` view (an OCR
    table's, each unit once as its latest run read it: `register_views(each_unit_once=True)`):
    a BM25 index (DuckDB fts, from its package, English stemming, no stopwords: "right",
    "first", "name" are words a document is searched for) built in memory for this query ->
    the SELECT of the units matching any of `terms`, best first."""
    if "text" not in {field.name for field in task.fields}:
        raise ValueError(
            f"--search reads the text of an OCR table; this table's task is {task.name}"
        )
    load_fts(connection)
    connection.execute(
        "CREATE OR REPLACE TABLE search_text AS SELECT row_number() OVER () AS row_key, "
        "run_date, run_id, item_id, source_uri, text FROM predictions "
        "WHERE status = 'ok' AND text <> ''"
    )
    connection.execute(
        "PRAGMA create_fts_index('search_text', 'row_key', 'text', stopwords = 'none', "
        "overwrite = 1)"
    )
    literal = sql_string(terms)
    return f"""
        SELECT regexp_extract(source_uri, '[^/]+$') AS image, round(score, 3) AS score,
               run_id, source_uri, text
        FROM (SELECT *, fts_main_search_text.match_bm25(row_key, {literal}) AS score
              FROM search_text)
        WHERE score IS NOT NULL
        ORDER BY score DESC, source_uri
    """


def load_fts(connection: Any) -> None:
    """DuckDB full-text search from its package (no download)."""
    _load_packaged_extension(connection, "fts", "full-text search (--search) in DuckDB")


def _spatial_loaded(connection: Any) -> bool:
    """Whether DuckDB spatial is loaded on the connection (`connect` loads it where the geo
    extra is installed)."""
    loaded = connection.execute(
        "SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'spatial'"
    ).fetchone()
    return bool(loaded and loaded[0])


def load_spatial(connection: Any) -> None:
    """DuckDB spatial from its package (no download): footprints read as GEOMETRY."""
    _load_packaged_extension(connection, "spatial", "geometries in DuckDB")


def _load_httpfs(connection: Any) -> None:
    _load_packaged_extension(connection, "httpfs", "s3:// in DuckDB")


def load_iceberg(connection: Any) -> None:
    """DuckDB iceberg (and the avro it reads manifests with) from their packages, offline."""
    _load_packaged_extension(connection, "avro", "Iceberg tables in DuckDB")
    _load_packaged_extension(connection, "iceberg", "Iceberg tables in DuckDB")


def _load_packaged_extension(connection: Any, name: str, purpose: str) -> None:
    """LOAD an extension from its `duckdb-extension-{name}` package, offline."""
    module = f"duckdb_extension_{name}"
    try:
        package = Path(importlib.import_module(module).__file__ or "").parent
    except ImportError as err:
        raise ImportError(f"{purpose} needs: pip install duckdb-extension-{name}") from err
    extension = next(package.glob(f"extensions/*/{name}.duckdb_extension"))
    connection.execute(f"LOAD {sql_string(str(extension))}")


def _has_s3_secret(connection: Any) -> bool:
    found = connection.execute("SELECT count(*) FROM duckdb_secrets() WHERE name = 'vision_ops_s3'")
    return bool(found.fetchone()[0])


def _s3_secret_sql(s3: dict[str, Any]) -> str:
    """CREATE SECRET for s3://: the AWS SDK's default chain (its order is botocore's), or no
    credentials where the spec says `anon: true`. Names no credential: the chain finds them."""
    if s3.get("anon"):
        options = ["TYPE s3", "PROVIDER config"]
    else:
        options = ["TYPE s3", "PROVIDER credential_chain"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options.append(f"REGION {sql_string(region)}")
    endpoint = _endpoint(s3)
    if endpoint:
        url = urlparse(without_userinfo(endpoint))  # never a user or password it held
        options += [f"ENDPOINT {sql_string(url.netloc)}", "URL_STYLE 'path'"]
        options += [f"USE_SSL {str(url.scheme == 'https').lower()}"]
    return f"CREATE OR REPLACE SECRET vision_ops_s3 ({', '.join(options)})"


def _endpoint(s3: dict[str, Any]) -> str | None:
    """The S3 endpoint: the spec's (s3fs `endpoint_url`), else AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL as botocore reads them; None for AWS itself."""
    return (
        s3.get("endpoint_url")
        or s3.get("client_kwargs", {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
