"""`vision-ops query` / `report` on s3:// without static keys in the environment: DuckDB takes
the standard AWS credential chain (a profile file, an STS session token), on SeaweedFS with a
real STS, for Parquet and Iceberg tables; no secret reaches the output."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow as pa
import pytest
import yaml

from vision_ops.config import OutputSpec
from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3
from vision_ops.iceberg import IcebergSink
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_ERROR, STATUS_OK, item_id
from vision_ops.sink import ParquetSink

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
DATE = dt.date(2026, 11, 24)
LABELS = ["cat", "dog", "cat", "cat", "dog"]  # the ok rows' top-1; one error row besides
ROLE = "arn:aws:iam::000000000000:role/nightly-reader"
# SeaweedFS's advanced IAM: an STS that signs session tokens, and a role anyone may assume.
STS_CONFIG = {
    "sts": {
        "tokenDuration": 3_600_000_000_000,
        "maxSessionLength": 43_200_000_000_000,
        "issuer": "vision-ops-tests",
        "signingKey": "dmlzaW9uLW9wcy10ZXN0cy1zdHMtc2lnbmluZy1rZXk=",
    },
    "policy": {"defaultEffect": "Deny", "storeType": "memory"},
    "roles": [
        {
            "roleName": "nightly-reader",
            "roleArn": ROLE,
            "trustPolicy": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole"]}
                ],
            },
            "attachedPolicies": ["everything"],
        }
    ],
    "policies": [
        {
            "name": "everything",
            "document": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                    {"Effect": "Allow", "Action": "s3tables:*", "Resource": "*"},
                    {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
                ],
            },
        }
    ],
}


@pytest.fixture(scope="module")
def sts_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS whose STS hands out temporary credentials (AssumeRole) with a session
    token; its admin key pair (the environment's) writes the tables."""
    config = tmp_path_factory.mktemp("iam") / "iam.json"
    config.write_text(json.dumps(STS_CONFIG))
    with SeaweedS3(buckets=("out",), table_bucket="tables", iam_config=config) as server:
        yield server


def rows(run_id: str) -> pa.Table:
    uris = [f"s3://images/cred/{i}.jpg" for i in range(len(LABELS) + 1)]
    columns = {
        "run_id": [run_id] * len(uris),
        "item_id": [item_id(uri) for uri in uris],
        "source_uri": uris,
        "model_name": ["m"] * len(uris),
        "model_weights_sha256": ["h"] * len(uris),
        "task": ["classification"] * len(uris),
        "status": [STATUS_ERROR] + [STATUS_OK] * len(LABELS),
        "error_type": ["NotAnImage"] + [None] * len(LABELS),
        "label": [None, *LABELS],
        "score": np.linspace(0.5, 1, len(uris), dtype=np.float32),
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(len(uris), f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


@pytest.fixture(scope="module")
def specs(sts_s3: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Specs of a committed Parquet table and a committed Iceberg table, both on s3://."""
    folder = tmp_path_factory.mktemp("specs")
    options = {"s3": sts_s3.storage_options()}
    sink = ParquetSink("s3://out/preds", "nightly", DATE, PREDICTION_SCHEMA, 250_000, options)
    sink.write(rows("nightly"))
    sink.commit()
    iceberg = OutputSpec(
        format="iceberg",
        uri="s3://out/iceberg-preds",
        table="creds.preds",
        catalog=sts_s3.catalog_properties(),
    )
    table = IcebergSink(iceberg, "nightly", DATE, PREDICTION_SCHEMA, options)
    table.write(rows("nightly"))
    table.commit(None, {})
    found = {}
    for name, output in (("parquet", {"uri": "s3://out/preds"}), ("iceberg", iceberg.model_dump())):
        spec = {
            "input": {"uris": ["s3://images/cred/"]},
            "model": {"architecture": "mobilenet_v3_small"},
            "output": {k: v for k, v in output.items() if v is not None},
            "storage_options": options,
        }
        found[name] = folder / f"{name}.yaml"
        found[name].write_text(yaml.safe_dump(spec))
    return found


def assumed_role(server: SeaweedS3) -> dict[str, str]:
    """Temporary credentials from the server's STS, as an instance role or SSO would give."""
    sts = boto3.client(
        "sts",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    found = sts.assume_role(RoleArn=ROLE, RoleSessionName="nightly-report")["Credentials"]
    assert found["AccessKeyId"] != LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"] and found["SessionToken"]
    return {
        "aws_access_key_id": found["AccessKeyId"],
        "aws_secret_access_key": found["SecretAccessKey"],
        "aws_session_token": found["SessionToken"],
    }


def profile_only(folder: Path, credentials: dict[str, str]) -> dict[str, str]:
    """An environment with no AWS key in it: the credentials live in a shared-credentials file
    under a named profile (region in the config file), as `aws configure` / SSO leave them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    (folder / "credentials").write_text(
        "[nightly]\n" + "".join(f"{key} = {value}\n" for key, value in credentials.items())
    )
    (folder / "config").write_text("[profile nightly]\nregion = us-east-1\n")
    return env | {
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "credentials"),
        "AWS_CONFIG_FILE": str(folder / "config"),
        "AWS_PROFILE": "nightly",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to fall back on here
    }


def vision_ops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vision_ops.cli", *args],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def secrets_in(done: subprocess.CompletedProcess[str], credentials: dict[str, Any]) -> list[str]:
    secret = [credentials["aws_secret_access_key"], credentials.get("aws_session_token", "")]
    return [s for s in filter(None, secret) if s in done.stdout + done.stderr]


# SeaweedFS's catalog lists an admin's Iceberg tables to the admin's own keys only (an assumed
# role does not see them), so the session token is proven on the Parquet table.
@pytest.mark.parametrize(
    ("table", "kind"),
    [
        ("parquet", "profile keys"),
        ("parquet", "sts session token"),
        ("iceberg", "profile keys"),
    ],
)
def test_query_and_report_read_s3_with_credentials_only_in_a_profile(
    sts_s3, specs, tmp_path, table, kind
) -> None:
    static = {
        "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    credentials = static if kind == "profile keys" else assumed_role(sts_s3)
    env = profile_only(tmp_path, credentials)
    sql = "SELECT label, count(*) AS n FROM predictions WHERE status = 'ok' GROUP BY label"
    done = vision_ops(env, "query", str(specs[table]), sql, "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    found = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(found, key=lambda r: r["label"]) == [
        {"label": "cat", "n": 3},
        {"label": "dog", "n": 2},
    ]
    reported = vision_ops(env, "report", str(specs[table]))
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "nightly" in reported.stdout and "NotAnImage" in reported.stdout
    assert secrets_in(done, credentials) == secrets_in(reported, credentials) == []


def test_temporary_credentials_without_their_session_token_are_refused(
    sts_s3, specs, tmp_path
) -> None:
    """The session token is what makes the temporary key work: the chain must carry it."""
    credentials = assumed_role(sts_s3)
    del credentials["aws_session_token"]
    done = vision_ops(profile_only(tmp_path, credentials), "query", str(specs["parquet"]))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "error: Forbidden" in done.stderr
    assert secrets_in(done, credentials) == []


def test_no_credentials_anywhere_is_a_clear_error(specs, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "HOME": str(tmp_path),  # no ~/.aws
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    done = vision_ops(env, "query", str(specs["parquet"]))
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr
    assert "reading s3:// needs AWS credentials" in done.stderr


def test_a_local_table_is_queried_with_an_s3_endpoint_set_and_no_credentials(tmp_path) -> None:
    """AWS_ENDPOINT_URL set for a local S3 server, no credentials anywhere: a table on local
    disk is queried all the same (the S3 secret is only required for a table on s3://)."""
    import datetime as dt

    import pyarrow as pa

    from vision_ops.schema import PREDICTION_SCHEMA, item_id
    from vision_ops.sink import ParquetSink

    uris = [f"file:///photos/{i}.jpg" for i in range(3)]
    rows = [
        {"run_id": "r1", "source_uri": u, "item_id": item_id(u), "model_name": "m",
         "model_weights_sha256": "h", "task": "classification", "status": "ok", "label": "cat"}
        for u in uris
    ]  # fmt: skip
    sink = ParquetSink(str(tmp_path / "table"), "r1", dt.date(2026, 12, 4), PREDICTION_SCHEMA)
    sink.write(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
    sink.commit(uris)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "HOME": str(tmp_path),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
    }
    sql = "SELECT count(*) AS n FROM predictions"
    done = vision_ops(env, "query", str(tmp_path / "table"), sql, "--format", "csv")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["n", "3"]
