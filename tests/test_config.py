"""The job spec: defaults, every kind of mistake named by its field, overrides and run identity."""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pydantic
import pytest

from vision_ops import config
from vision_ops.config import (
    DEFAULT_EXTENSIONS,
    JobSpec,
    RunSpec,
    RuntimeSpec,
    SpecError,
    apply_override,
    load_spec,
    parse_spec,
)

SHA = "0123456789abcdef" * 4
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = SECRET.replace("/", "")  # a URL's user holds no /
HEADER = "invalid job spec (1 problem(s)):"


def minimal() -> dict[str, Any]:
    return {
        "input": {"uris": ["s3://images/2024/"]},
        "model": {"architecture": "resnet50"},
        "output": {"uri": "s3://out/predictions"},
    }


def with_value(dotted: str, value: Any) -> dict[str, Any]:
    """The minimal spec with one nested value set (or replaced)."""
    raw = minimal()
    *parents, leaf = dotted.split(".")
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return raw


def spec_error(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return str(caught.value)


# --- a valid spec --------------------------------------------------------------------------------


def test_minimal_spec_fills_every_default() -> None:
    spec = parse_spec(minimal())
    assert spec.input.model_dump() == {
        "uris": ["s3://images/2024/"],
        "manifest": None,
        "extensions": sorted(DEFAULT_EXTENSIONS),
        "max_pixels": 178_956_970,
        "bits_stored": 16,
        "max_file_mb": 2048,
        "dicom": None,
        "tiling": None,
    }
    assert spec.task.model_dump() == {"kind": "classification", "top_k": 5}
    assert spec.model.model_dump() == {
        "kind": "torchvision",
        "architecture": "resnet50",
        "name": None,
        "labels": None,
        "preprocessing": None,
        "weights": None,
        "weights_sha256": None,
        "num_classes": None,
        "kwargs": {},
    }
    assert spec.runtime.model_dump() == {
        "batch_size": None,  # derived when sized for the pool (test_batch_sizes_...)
        "min_actors": None,  # the whole pool on a fixed cluster (test_pool)
        "max_actors": None,
        "num_gpus_per_actor": None,
        "num_cpus_per_actor": 1,
        "reserved_cpus": 1,
        "device": "auto",
        "autocast": "off",
        "autoscaling": False,
        "read_batch_size": None,
        "decode": "tasks",
        "channels_last": True,
        "fold_batch_norm": True,
        "compile": False,
        "compile_min_inputs": 3000,
        "compile_min_inputs_cold": 8000,
        "compile_only_where_cached": False,
        "predict_in": "actors",
        "runner": "ray",  # Ray unless asked (test_in_process)
        "driver_max_inputs": 1000,  # with predict_in: auto (test_pool)
        "local_dashboard": False,  # the embedded cluster starts without it (test_secrets)
        "retain_host_memory": True,
        "intra_op_threads": None,
        "queue_mb": None,
        "stall_timeout_s": 1800,
        "durable_every_rows": 100_000,
        "durable_every_s": 120.0,
    }
    assert spec.output.model_dump() == {
        "format": "parquet",
        "uri": "s3://out/predictions",
        "rows_per_file": 250_000,
        "table": None,
        "catalog": {},
    }
    assert spec.run.model_dump() == {
        "id": None,
        "date": None,
        "incremental": False,
        "skip_errors": [],
        "lock_lease_s": 6 * 3600,
    }
    assert spec.storage_options == {}


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        (
            {"kind": "torchvision", "architecture": "resnet18", "weights": "s3://m/w.pt"}
            | {"weights_sha256": SHA},
            "torchvision",
        ),
        ({"kind": "torchscript", "uri": "s3://models/m.pt", "sha256": SHA}, "torchscript"),
        (
            {"kind": "entrypoint", "entrypoint": "my_pkg.models:build", "kwargs": {"depth": 3}},
            "entrypoint",
        ),
    ],
)
def test_each_model_kind_parses(model: dict[str, Any], kind: str) -> None:
    spec = parse_spec(with_value("model", model))
    assert spec.model.kind == kind
    assert spec.model.model_dump(exclude_defaults=True) | {"kind": kind} == model


def test_manifest_alone_is_enough_input() -> None:
    spec = parse_spec(with_value("input", {"manifest": "s3://images/inventory.csv"}))
    assert spec.input.uris == []
    assert spec.input.manifest == "s3://images/inventory.csv"


def test_extensions_are_normalised() -> None:
    spec = parse_spec(with_value("input.extensions", ["JPG", ".Png", "jpg", "tif"]))
    assert spec.input.extensions == [".jpg", ".png", ".tif"]


def test_preprocessing_parses() -> None:
    preprocessing = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.25] * 3}
    spec = parse_spec(with_value("model.preprocessing", preprocessing))
    assert spec.model.preprocessing is not None
    assert spec.model.preprocessing.mean == (0.5, 0.5, 0.5)
    assert spec.model.preprocessing.interpolation == "bilinear"


def test_run_date_parses_from_text() -> None:
    spec = parse_spec(with_value("run", {"id": "nightly.2024-05-01_a", "date": "2024-05-01"}))
    assert spec.run.date == dt.date(2024, 5, 1)
    assert spec.run.id == "nightly.2024-05-01_a"


def test_storage_options_without_credentials_are_kept() -> None:
    options = {
        "s3": {
            "endpoint_url": "http://127.0.0.1:8333",
            "client_kwargs": {"region_name": "us-east-1"},
            "anon": False,
        }
    }
    assert parse_spec(with_value("storage_options", options)).storage_options == options


def test_spec_is_frozen() -> None:
    spec = parse_spec(minimal())
    with pytest.raises(pydantic.ValidationError):
        spec.runtime.batch_size = 64


# --- mistakes: each names the field path, what was expected and what was found -------------------

RUN_ID_EXPECTED = "expected 1 to 128 letters, digits, '.', '_' or '-', the first a letter or digit"
MISTAKES = {
    "unknown top-level field": (
        with_value("colour", "red"),
        "colour: Extra inputs are not permitted (found: 'red')",
    ),
    "unknown nested field": (
        with_value("runtime.batch_sise", 64),
        "runtime.batch_sise: Extra inputs are not permitted (found: 64)",
    ),
    "unknown field in a model": (
        with_value("model.layers", 50),
        "model.layers: Extra inputs are not permitted (found: 50)",
    ),
    "wrong type": (
        with_value("runtime.batch_size", "lots"),
        "runtime.batch_size: Input should be a valid integer, unable to parse string as an "
        "integer (found: 'lots')",
    ),
    "negative batch size": (
        with_value("runtime.batch_size", -4),
        "runtime.batch_size: Input should be greater than 0 (found: -4)",
    ),
    "zero top_k": (
        with_value("task.top_k", 0),
        "task.top_k: Input should be greater than 0 (found: 0)",
    ),
    "unknown device": (
        with_value("runtime.device", "tpu"),
        "runtime.device: Input should be 'auto', 'cpu' or 'cuda' (found: 'tpu')",
    ),
    "no input": (
        with_value("input", {}),
        "input: expected at least one of `uris` or `manifest`, found neither",
    ),
    "empty uris and no manifest": (
        with_value("input", {"uris": []}),
        "input: expected at least one of `uris` or `manifest`, found neither",
    ),
    "unknown model kind": (
        with_value("model", {"kind": "caffe", "uri": "m.caffemodel"}),
        "model: expected kind: torchvision, torchscript, entrypoint, onnx or ppocr "
        "(found: {'kind': 'caffe', 'uri': 'm.caffemodel'})",
    ),
    "model not a mapping": (
        with_value("model", "resnet50"),
        "model: Input should be a valid dictionary or instance of TorchvisionModel "
        "(found: 'resnet50')",
    ),
    "unknown task kind": (
        with_value("task", {"kind": "captioning"}),
        "task: expected kind: classification, detection, embedding, ocr or segmentation "
        "(found: {'kind': 'captioning'})",
    ),
    "task not a mapping": (
        with_value("task", "ocr"),
        "task: expected a mapping with a kind (classification, detection, embedding, ocr or "
        "segmentation) (found: 'ocr')",
    ),
    "a setting of another task": (
        with_value("task", {"kind": "detection", "top_k": 3}),
        "task.top_k: Extra inputs are not permitted (found: 3)",
    ),
    "weights_sha256 too short": (
        with_value("model.weights_sha256", "abc123"),
        "model.weights_sha256: expected a SHA-256 as 64 lower-case hex digits (found: 'abc123')",
    ),
    "weights_sha256 upper case": (
        with_value("model.weights_sha256", SHA.upper()),
        "model.weights_sha256: expected a SHA-256 as 64 lower-case hex digits "
        f"(found: '{SHA.upper()}')",
    ),
    "torchscript sha256": (
        with_value("model", {"kind": "torchscript", "uri": "m.pt", "sha256": "xyz"}),
        "model.sha256: expected a SHA-256 as 64 lower-case hex digits (found: 'xyz')",
    ),
    "entrypoint not module:function": (
        with_value("model", {"kind": "entrypoint", "entrypoint": "os.system('rm')"}),
        "model.entrypoint: expected package.module:function (found: \"os.system('rm')\")",
    ),
    "entrypoint missing": (
        with_value("model", {"kind": "entrypoint"}),
        "model.entrypoint: Field required (found: {'kind': 'entrypoint'})",
    ),
    "bad run id": (
        with_value("run.id", "bad id!"),
        f"run.id: {RUN_ID_EXPECTED} (found: 'bad id!')",
    ),
    "run id starting with a dot": (
        with_value("run.id", "../up"),
        f"run.id: {RUN_ID_EXPECTED} (found: '../up')",
    ),
    "bad run date": (
        with_value("run.date", "2024-13-45"),
        "run.date: Input should be a valid date or datetime, month value is outside expected "
        "range of 1-12 (found: '2024-13-45')",
    ),
    "zero std": (
        with_value(
            "model.preprocessing",
            {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]},
        ),
        "model.preprocessing.std: expected three positive numbers, found [0.2, 0.0, 0.2]",
    ),
    "dicom window without its width": (
        with_value("input.dicom", {"window": {"center": 40}}),
        "input.dicom.window.width: Field required (found: {'center': 40})",
    ),
    "missing output uri": (
        with_value("output", {}),
        "output.uri: Field required (found: {})",
    ),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_mistake_is_named_with_expected_and_found(name: str) -> None:
    raw, line = MISTAKES[name]
    assert spec_error(raw).splitlines() == [HEADER, f"  {line}"]


def test_missing_section_is_named() -> None:
    raw = minimal()
    del raw["output"]
    lines = spec_error(raw).splitlines()
    assert lines[0] == HEADER
    assert lines[1].startswith("  output: Field required (found: {'input': ")


def test_run_id_longer_than_128_is_refused() -> None:
    assert parse_spec(with_value("run.id", "a" * 128)).run.id == "a" * 128
    assert (
        spec_error(with_value("run.id", "a" * 129))
        .splitlines()[1]
        .startswith(f"  run.id: {RUN_ID_EXPECTED}")
    )


def test_every_problem_is_listed() -> None:
    raw = with_value("runtime", {"batch_size": 0, "min_actors": "two"})
    raw["input"] = {}
    assert spec_error(raw).splitlines() == [
        "invalid job spec (3 problem(s)):",
        "  input: expected at least one of `uris` or `manifest`, found neither",
        "  runtime.batch_size: Input should be greater than 0 (found: 0)",
        "  runtime.min_actors: Input should be a valid integer, unable to parse string as an "
        "integer (found: 'two')",
    ]


def test_long_found_value_is_shortened() -> None:
    line = spec_error(with_value("run.id", "x y" * 100)).splitlines()[1]
    found = line[line.index("(found: ") + len("(found: ") : -1]
    assert len(found) == 80
    assert found.endswith("...")


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"s3": {"secret": SECRET}}, "s3.secret"),
        ({"s3": {"key": "AKIAEXAMPLE", "secret": SECRET}}, "s3.key"),
        ({"s3": {"client_kwargs": {"aws_secret_access_key": SECRET}}}, "s3.client_kwargs."),
        ({"s3": {"client_kwargs": {"Aws_Session_Token": SECRET}}}, "s3.client_kwargs."),
        ({"gs": {"token": SECRET}}, "gs.token"),
        ({"az": {"account_name": "acct", "connection_string": SECRET}}, "az.connection_string"),
        ({"az": {"sas_token": SECRET}}, "az.sas_token"),
        ({"s3": {"endpoint_url": f"http://minio:{SECRET}@127.0.0.1:9000"}}, "s3.endpoint_url"),
        ({"s3": {"client_kwargs": {"endpoint_url": f"https://u:{SECRET}@h"}}}, "s3.client_kwargs."),
        # names that are no key of a fixed list (each passed before), and a list of options
        ({"s3": {"session_token": SECRET}}, "s3.session_token"),
        ({"https": {"headers": {"X-Api-Key": SECRET}}}, "https.headers.X-Api-Key"),
        ({"https": {"headers": {"Cookie": f"session={SECRET}"}}}, "https.headers.Cookie"),
        (
            {"s3": {"s3_additional_kwargs": {"SSECustomerKey": SECRET}}},
            "s3.s3_additional_kwargs.SSECustomerKey",
        ),
        (
            {"s3": {"client_kwargs": [{"aws_secret_access_key": SECRET}]}},
            "s3.client_kwargs.0.aws_secret_access_key",
        ),
    ],
)
def test_credentials_in_storage_options_are_refused_without_echo(
    options: dict[str, Any], path: str
) -> None:
    message = spec_error(with_value("storage_options", options))
    assert SECRET not in message
    lines = message.splitlines()
    assert lines[0] == HEADER
    assert lines[1].startswith(f"  storage_options: {path}")
    assert lines[1].endswith(
        " looks like a credential; credentials never go in the spec: use the standard "
        "AWS/GCP/Azure credential chain (environment, profile, instance role)"
    )


def test_storage_options_that_only_resemble_a_credential_are_kept() -> None:
    """A KMS key's id, botocore's signature version, paramiko's key file, an endpoint:
    settings, not secrets."""
    options = {
        "s3": {
            "endpoint_url": "http://127.0.0.1:9000",
            "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "k-1"},
            "config_kwargs": {"signature_version": "s3v4"},
        },
        "sftp": {"key_filename": "/home/me/.ssh/id_ed25519", "look_for_keys": False},
    }
    assert parse_spec(with_value("storage_options", options)).storage_options == options


def test_storage_options_of_a_protocol_fsspec_does_not_know_are_refused() -> None:
    """Options go by a URI's protocol as written: under `S3` they would apply to nothing, and
    the run would reach the default endpoint with whatever credentials the machine has."""
    message = spec_error(with_value("storage_options", {"S3": {"endpoint_url": "http://h:9"}}))
    assert message.splitlines()[1].startswith(
        "  storage_options: S3: not a protocol fsspec knows, so its options would apply to nothing"
    )
    headers = {"http": {"headers": {"Authorization": f"Bearer {SECRET}"}}}
    message = spec_error(with_value("storage_options", headers))
    assert "http.headers.Authorization looks like a credential" in message
    assert SECRET not in message and "wJalr" not in message


def test_a_lock_lease_of_seconds_is_refused() -> None:
    message = spec_error(with_value("run.lock_lease_s", 1))
    assert "run.lock_lease_s: Input should be greater than or equal to 60 (found: 1)" in message
    assert parse_spec(with_value("run.lock_lease_s", 60)).run.lock_lease_s == 60


@pytest.mark.parametrize("dotted", ["runtime.num_gpus_per_actor", "runtime.num_cpus_per_actor"])
def test_a_resource_below_rays_unit_is_refused_before_any_work(dotted: str) -> None:
    """Ray refuses an actor asking for under 0.0001 of a CPU or GPU."""
    message = spec_error(with_value(dotted, 0.00004))
    expected = "below Ray's smallest resource unit; expected 0 or at least 0.0001 (found: 4e-05)"
    assert f"{dotted}: {expected}" in message
    runtime = parse_spec(with_value(dotted, 0.0001)).runtime
    assert getattr(runtime, dotted.rpartition(".")[2]) == 0.0001


@pytest.mark.parametrize(
    "dotted", ["runtime.reserved_cpus", "runtime.num_cpus_per_actor", "runtime.durable_every_s"]
)
@pytest.mark.parametrize("number", [math.inf, math.nan])
def test_a_number_that_is_not_finite_is_refused(dotted: str, number: float) -> None:
    """`.inf` in YAML passed, then overflowed where the pool was sized (a traceback)."""
    message = spec_error(with_value(dotted, number))
    assert message.splitlines()[1].startswith(f"  {dotted}: Input should be a finite number")


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("runtime.batch_size", True),  # YAML `yes`: it ran with a batch of one
        ("task.top_k", False),
        ("runtime.reserved_cpus", True),  # a float field
        ("input.tiling", {"size": 256, "overlap": True}),
        ("input.tiling", {"size": 256, "bands": [True]}),  # in a list
        ("model.preprocessing", {"resize": 8, "crop": 8, "mean": [True, 0.5, 0.5]}),
        ("evaluate", {"truth": "s3://l/h.csv", "min": {"accuracy": True}}),  # a mapping
    ],
)
def test_a_yes_or_no_where_a_number_goes_is_refused(dotted: str, value: object) -> None:
    message = spec_error(with_value(dotted, value))
    assert message.splitlines()[1].endswith(": expected a number, found a yes or no")
    flags = parse_spec(with_value("run.incremental", True))  # a flag takes one
    assert flags.run.incremental is True


def test_a_nan_nodata_is_the_one_non_finite_number_a_spec_takes() -> None:
    tiling = {"size": 256, "nodata": math.nan}
    assert math.isnan(parse_spec(with_value("input.tiling", tiling)).input.tiling.nodata)


def test_nested_credential_path_is_named_in_full() -> None:
    options = {"s3": {"client_kwargs": {"aws_secret_access_key": SECRET}}}
    line = spec_error(with_value("storage_options", options)).splitlines()[1]
    assert line.startswith("  storage_options: s3.client_kwargs.aws_secret_access_key looks like")


@pytest.mark.parametrize(
    "raw",
    [
        # another problem whose `found` is the whole spec, storage_options included
        {**with_value("storage_options", {"s3": {"secret": SECRET}}), "output": None},
        {key: value for key, value in minimal().items() if key != "output"}
        | {"storage_options": {"s3": {"client_kwargs": {"aws_secret_access_key": SECRET}}}},
        # credentials put in the wrong place
        with_value("aws_secret_access_key", SECRET),
        with_value("input.storage_options", {"s3": {"secret": SECRET}}),
        with_value("model.weights", {"token": SECRET}),
        with_value("storage_options", {"s3": SECRET}),
    ],
    ids=["output-null", "output-missing", "top-level", "input", "model-weights", "not-a-dict"],
)
def test_secret_values_never_appear_in_any_message(raw: dict[str, Any]) -> None:
    message = spec_error(raw)
    assert SECRET not in message
    assert "wJalr" not in message


@pytest.mark.parametrize(
    ("dotted", "value", "field"),
    [
        ("input.uris", [f"s3://AKIAEXAMPLE:{SECRET}@bucket/photos/"], "input.uris.0"),
        ("input.manifest", f"s3://AKIAEXAMPLE:{SECRET}@bucket/list.txt", "input.manifest"),
        ("output.uri", f"s3://AKIAEXAMPLE:{SECRET}@bucket/table", "output.uri"),
        ("model.weights", f"s3://AKIAEXAMPLE:{SECRET}@bucket/w.pt", "model.weights"),
        ("model.labels", f"https://{TOKEN}@models.example/labels.txt", "model.labels"),
        ("evaluate", {"truth": f"gs://u:{SECRET}@b/truth.csv"}, "evaluate.truth"),
    ],
)
def test_a_uri_with_credentials_is_refused_without_echo(
    dotted: str, value: Any, field: str
) -> None:
    """Every URI a spec names: a user or password in it would reach logs and error messages
    (a store's own error quotes the bucket name it was handed)."""
    message = spec_error(with_value(dotted, value))
    assert SECRET not in message and "wJalr" not in message
    assert message.splitlines()[1].startswith(
        f"  {field}: a URI with credentials in it (a password, a token, a signed query)"
    )
    assert "***@" in message  # the value found, its credentials masked


@pytest.mark.parametrize(
    "uri",
    [
        "abfs://photos@account.dfs.core.windows.net/2024/",  # a container, not a user
        "s3://cams/2024-01-01T10:00:00/frame@2x.png",  # an @ and : in a key
        "https://cdn.example.com/models/resnet50@v2.pt",
        "file:///data/a:b@c.jpg",
    ],
)
def test_a_uri_with_an_at_that_names_no_user_is_no_credential(uri: str) -> None:
    assert parse_spec(with_value("input.uris", [uri])).input.uris == [uri]
    catalog = {**ICEBERG_OUTPUT["catalog"], "warehouse": uri}  # type: ignore[dict-item]
    assert parse_spec(with_value("output", {**ICEBERG_OUTPUT, "catalog": catalog}))


@pytest.mark.parametrize(
    "uri",
    [
        f"https://acct.blob.core.windows.net/m/r50.pt?sv=2024&sig={SECRET}",  # an Azure SAS
        f"https://b.s3.amazonaws.com/w.pt?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}",
        f"https://storage.googleapis.com/b/w.pt?X-Goog-Signature={SECRET}",
        f"https://storage.googleapis.com/storage/v1/b/m/o/w.pt?alt=media&key={SECRET}",  # API key
        f"https://models.example/w.pt?Password={SECRET}",  # any credential's name in a query
    ],
)
def test_a_signed_url_is_refused_without_echo(uri: str) -> None:
    message = spec_error(with_value("model.weights", uri))
    assert SECRET not in message and "***" in message
    assert "model.weights: a URI with credentials in it" in message


def test_a_token_as_an_http_urls_user_is_refused_in_any_case_of_scheme() -> None:
    message = spec_error(with_value("model.weights", "HTTPS://ghp_TOKEN123@models.example/w.pt"))
    assert "ghp_TOKEN123" not in message and "HTTPS://***@models.example" in message


def test_credential_found_value_is_masked() -> None:
    lines = spec_error(with_value("aws_secret_access_key", SECRET)).splitlines()
    assert lines == [
        HEADER,
        "  aws_secret_access_key: Extra inputs are not permitted (found: '***')",
    ]


# --- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "path", "value"),
    [
        ("runtime.batch_size=64", ("runtime", "batch_size"), 64),
        ("input.uris=[a, b]", ("input", "uris"), ["a", "b"]),
        ("run.id=x", ("run", "id"), "x"),
        ("run.date=2024-05-01", ("run", "date"), dt.date(2024, 5, 1)),
        ("model.weights=null", ("model", "weights"), None),
        ("runtime.autoscaling=true", ("runtime", "autoscaling"), True),
        ("output.uri=s3://out/a=b", ("output", "uri"), "s3://out/a=b"),
        (" runtime.num_gpus_per_actor =0.5", ("runtime", "num_gpus_per_actor"), 0.5),
    ],
)
def test_override_sets_a_parsed_value(override: str, path: tuple[str, str], value: Any) -> None:
    raw = minimal()
    apply_override(raw, override)
    section, leaf = path
    assert raw[section][leaf] == value
    untouched = minimal()
    for name in untouched:
        if name != section:
            assert raw[name] == untouched[name]


def test_override_creates_missing_sections() -> None:
    raw: dict[str, Any] = {}
    apply_override(raw, "runtime.batch_size=64")
    apply_override(raw, "run.id=nightly")
    assert raw == {"runtime": {"batch_size": 64}, "run": {"id": "nightly"}}


def test_overrides_apply_to_the_parsed_spec() -> None:
    raw = minimal()
    for override in ("runtime.batch_size=64", "input.uris=[a, b]", "run.id=x"):
        apply_override(raw, override)
    spec = parse_spec(raw)
    assert spec.runtime.batch_size == 64
    assert spec.input.uris == ["a", "b"]
    assert spec.run.id == "x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("input.uris.first=a", "--set input.uris.first: uris is not a mapping"),
        ("output.uri.x=1", "--set output.uri.x: uri is not a mapping"),
        ("runtime.batch_size", "--set 'runtime.batch_size': expected KEY.PATH=VALUE"),
        ("=5", "--set: expected KEY.PATH=VALUE, found no KEY.PATH before the ="),
        ("  =5", "--set: expected KEY.PATH=VALUE, found no KEY.PATH before the ="),
        (  # the value is never quoted: it may be a secret
            "storage_options.s3.key=@AKIA1234SECRET",
            "--set storage_options.s3.key: not valid YAML: found character '@' that cannot "
            "start any token at line 1, column 1",
        ),
        (
            "run.date=2026-02-30",
            "--set run.date: not a valid date (day is out of range for month); expected YYYY-MM-DD",
        ),
        (  # the value is not quoted: it may be a secret
            "storage_options.s3.region=!!int us-hunter2",
            "--set storage_options.s3.region: not valid YAML: a value is not of the type it is "
            "tagged",
        ),
        (
            "runtime.batch_size=[8",
            "--set runtime.batch_size: not valid YAML: expected ',' or ']', "
            "but got '<stream end>' at line 1, column 3",
        ),
    ],
)
def test_bad_override_is_refused(override: str, message: str) -> None:
    raw = minimal()
    with pytest.raises(SpecError) as caught:
        apply_override(raw, override)
    assert str(caught.value) == message
    assert raw == minimal()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run: {date: 2026-02-30}\n", "spec file {path}: not a valid date (day is out of range"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "spec file {path}: nested too deeply"),
        ("a: &x [*x]\n", "invalid job spec: nested too deeply"),
        (  # the second would silently win
            "runtime: {batch_size: 8}\nruntime: {max_actors: 1}\n",
            "spec file {path}: not valid YAML: found 'runtime' twice in one mapping at line 2",
        ),
    ],
)
def test_a_spec_that_cannot_be_read_as_yaml_is_refused(tmp_path, text, message) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(message.format(path=path))


# --- load_spec ---------------------------------------------------------------------------------

SPEC_YAML = """\
input:
  uris: [s3://images/2024/]
model:
  architecture: resnet50
output:
  uri: s3://out/predictions
runtime:
  batch_size: 8
"""


def test_load_spec_reads_yaml_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC_YAML)
    assert load_spec(path).runtime.batch_size == 8
    spec = load_spec(str(path), ["runtime.batch_size=64", "run.id=x", "input.uris=[a, b]"])
    assert spec.runtime.batch_size == 64
    assert spec.run.id == "x"
    assert spec.input.uris == ["a", "b"]
    assert path.read_text() == SPEC_YAML


def test_load_spec_reports_an_override_made_invalid(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC_YAML)
    with pytest.raises(SpecError) as caught:
        load_spec(path, ["runtime.batch_size=-1"])
    assert str(caught.value).splitlines() == [
        HEADER,
        "  runtime.batch_size: Input should be greater than 0 (found: -1)",
    ]


def test_load_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"spec file {path}: not found"


def test_load_spec_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input: [unclosed\nmodel: {\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"spec file {path}: not valid YAML: ")
    assert "line" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "found"),
    [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "NoneType"), ("42\n", "int")],
)
def test_load_spec_non_mapping(tmp_path: Path, text: str, found: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"spec file {path}: expected a mapping, found {found}"


def test_load_spec_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path)
    assert str(caught.value).startswith(f"spec file {tmp_path}: cannot read: ")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SpecError) as caught:
        load_spec(binary)
    assert str(caught.value).startswith(f"spec file {binary}: cannot read: ")


# --- run identity --------------------------------------------------------------------------------


class FrozenClock:
    """Stands in for `datetime.datetime`: `now(tz)` is 23:30 UTC on 31 Dec 2024."""

    calls: ClassVar[list[Any]] = []

    @classmethod
    def now(cls, tz: Any = None) -> dt.datetime:
        cls.calls.append(tz)
        return dt.datetime(2024, 12, 31, 23, 30, tzinfo=dt.timezone.utc).astimezone(tz)


def test_resolved_run_defaults_to_today_utc_and_the_fingerprint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FrozenClock.calls = []
    fake_dt = SimpleNamespace(datetime=FrozenClock, timezone=dt.timezone, date=dt.date)
    monkeypatch.setattr(config, "dt", fake_dt)
    spec = parse_spec(minimal())
    run_id, run_date = spec.resolved_run()
    assert FrozenClock.calls == [dt.timezone.utc]
    assert run_date == dt.date(2024, 12, 31)
    assert run_id == f"2024-12-31-{spec.fingerprint()[:8]}"


def test_resolved_run_uses_the_real_utc_date() -> None:
    before = dt.datetime.now(dt.timezone.utc).date()
    run_id, run_date = parse_spec(minimal()).resolved_run()
    after = dt.datetime.now(dt.timezone.utc).date()
    assert run_date in {before, after}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[0-9a-f]{8}", run_id)
    assert run_id.startswith(run_date.isoformat())
    assert RunSpec(id=run_id).id == run_id  # the default id is one the spec accepts


def test_resolved_run_keeps_what_the_spec_says() -> None:
    spec = parse_spec(with_value("run", {"id": "backfill-7", "date": "2023-02-28"}))
    assert spec.resolved_run() == ("backfill-7", dt.date(2023, 2, 28))


def test_default_run_id_with_a_given_date() -> None:
    spec = parse_spec(with_value("run.date", "2023-02-28"))
    assert spec.resolved_run() == (f"2023-02-28-{spec.fingerprint()[:8]}", dt.date(2023, 2, 28))


def test_fingerprint_is_a_sha256_hex() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", parse_spec(minimal()).fingerprint())


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("runtime.batch_size", 256),
        ("runtime.max_actors", 8),
        ("runtime.num_gpus_per_actor", 0.5),
        ("runtime.device", "cpu"),
        ("run.id", "another-run"),
        ("run.date", "2020-01-01"),
        ("monitor.runs", 3),
        ("output.rows_per_file", 10),
    ],
)
def test_fingerprint_ignores_sizing_and_run_identity(dotted: str, value: Any) -> None:
    base = parse_spec(minimal())
    assert parse_spec(with_value(dotted, value)).fingerprint() == base.fingerprint()


def test_default_run_id_ignores_sizing() -> None:
    base = parse_spec(with_value("run.date", "2024-05-01"))
    raw = with_value("run.date", "2024-05-01")
    raw["runtime"] = {"batch_size": 256, "max_actors": 4}
    assert parse_spec(raw).resolved_run() == base.resolved_run()


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("model.architecture", "resnet18"),
        ("model.weights", "IMAGENET1K_V2"),
        ("input.uris", ["s3://images/2025/"]),
        ("input.max_pixels", 1000),
        ("task.top_k", 1),
        ("output.uri", "s3://out/other"),
    ],
)
def test_fingerprint_follows_what_decides_the_rows(dotted: str, value: Any) -> None:
    base = parse_spec(minimal())
    assert parse_spec(with_value(dotted, value)).fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    ("runtime", "gpu_share", "numerics"),
    [
        ({"autocast": "float16"}, 1.0, "cuda autocast=float16 decode=tasks"),
        ({"autocast": "float16"}, 0.0, "cpu autocast=off decode=tasks"),  # ignored on a CPU
        ({"autocast": "bfloat16", "device": "cpu"}, 1.0, "cpu autocast=off decode=tasks"),
        ({"decode": "device"}, 0.25, "cuda autocast=off decode=device"),
    ],
)
def test_the_numerics_a_runtime_gives_its_rows(runtime, gpu_share, numerics) -> None:
    """Apart from the fingerprint (sizing must not restart a run) but in the resume key: a
    rerun on CPUs of a run killed on GPUs with autocast does not reuse its rows."""
    assert RuntimeSpec(**runtime).numerics(gpu_share) == numerics


def test_fingerprint_is_independent_of_spelling() -> None:
    explicit = copy.deepcopy(minimal())
    explicit["task"] = {"kind": "classification", "top_k": 5}
    explicit["model"] = {"kind": "torchvision", "architecture": "resnet50", "weights": None}
    explicit["input"]["extensions"] = [ext.upper() for ext in reversed(DEFAULT_EXTENSIONS)]
    reordered = dict(reversed(list(explicit.items())))
    assert parse_spec(reordered).fingerprint() == parse_spec(minimal()).fingerprint()


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("2024-05-01-abcdef12", True),
        ("a", True),
        ("Run_1.b-2", True),
        ("", False),
        ("-leading-dash", False),
        ("has space", False),
        ("slash/inside", False),
        ("a" * 128, True),
        ("a" * 129, False),
        ("abc\n", False),
    ],
)
def test_run_id_pattern(value: str, valid: bool) -> None:
    if valid:
        assert RunSpec(id=value).id == value
    else:
        with pytest.raises(ValueError):
            RunSpec(id=value)


def test_job_spec_forbids_extra_fields_in_every_model() -> None:
    for model in (JobSpec, config.InputSpec, config.RuntimeSpec, config.TorchvisionModel):
        assert model.model_config.get("extra") == "forbid"


def test_max_actors_below_min_actors_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expected at least min_actors \(3\), found 2"):
        RuntimeSpec(min_actors=3, max_actors=2)


@pytest.mark.parametrize(
    ("task", "gpu_share", "expected"),
    [
        ("classification", 0, 8),
        ("classification", 1, 256),
        ("classification", 0.5, 128),
        ("classification", 0.3, 64),  # 76.8 of a whole GPU's 256, down to a power of two
        ("classification", 2, 256),  # a model runs on one device
        ("segmentation", 0, 8),
        ("segmentation", 1, 64),
        ("detection", 0, 4),
        ("detection", 1, 16),
        ("detection", 0.01, 1),
    ],
)
def test_batch_size_is_derived_from_the_task_and_the_actors_device(
    task: str, gpu_share: float, expected: int
) -> None:
    spec = parse_spec(with_value("task", {"kind": task}))
    assert spec.runtime.batch_size is None
    sized = spec.sized(gpu_share)
    assert sized.runtime.batch_size == sized.runtime.images_per_call == expected
    assert sized.runtime.read_batch_size == 16  # read tasks decode: small tasks feed the model
    assert sized.sized(gpu_share) == sized  # sizing twice changes nothing
    assert sized.fingerprint() == spec.fingerprint()  # sizing does not change the rows


def test_the_specs_batch_sizes_win_over_the_derived_ones() -> None:
    raw = with_value("runtime", {"batch_size": 12, "read_batch_size": 5})
    assert parse_spec(raw).sized(1).runtime.model_dump(
        include={"batch_size", "read_batch_size"}
    ) == {"batch_size": 12, "read_batch_size": 5}


def test_read_tasks_fetch_four_model_batches_when_the_actors_decode() -> None:
    def read_batch(gpu_share: float, **runtime: object) -> int | None:
        spec = parse_spec(with_value("runtime", {"decode": "device", **runtime}))
        return spec.sized(gpu_share).runtime.read_batch_size

    assert read_batch(0) == 4 * 8  # read tasks only fetch bytes: fewer, larger tasks
    assert read_batch(1) == 4 * 256
    assert read_batch(1, batch_size=8) == 32
    assert read_batch(1, read_batch_size=5) == 5


def test_an_unsized_spec_refuses_to_name_its_batch_sizes() -> None:
    runtime = parse_spec(minimal()).runtime
    with pytest.raises(
        RuntimeError, match=r"runtime\.batch_size is derived when the spec is sized"
    ):
        _ = runtime.images_per_call
    with pytest.raises(RuntimeError, match=r"runtime\.read_batch_size is derived"):
        _ = runtime.files_per_read_task


ICEBERG_OUTPUT = {
    "format": "iceberg",
    "uri": "s3://out/beside",
    "table": "vision.predictions",
    "catalog": {"type": "rest", "uri": "http://127.0.0.1:8181", "warehouse": "s3://tables/"},
}


def test_iceberg_output_parses_and_parquet_is_the_default() -> None:
    assert parse_spec(minimal()).output.format == "parquet"
    output = parse_spec(with_value("output", ICEBERG_OUTPUT)).output
    assert (output.format, output.table, output.catalog["type"]) == (
        "iceberg",
        "vision.predictions",
        "rest",
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({**ICEBERG_OUTPUT, "table": None}, "format: iceberg expects table"),
        ({**ICEBERG_OUTPUT, "catalog": {}}, "format: iceberg expects catalog"),
        (
            {**ICEBERG_OUTPUT, "table": "predictions"},
            "output.table: expected namespace.table (nested namespaces a.b.table; letters, digits "
            "and '_', not starting with a digit) (found: 'predictions')",
        ),
        ({**ICEBERG_OUTPUT, "format": "parquet"}, "table and catalog are for format: iceberg"),
        ({**ICEBERG_OUTPUT, "format": "delta"}, "output.format: Input should be 'parquet'"),
        (
            {**ICEBERG_OUTPUT, "catalog": {**ICEBERG_OUTPUT["catalog"], "type": "bogus"}},  # type: ignore[dict-item]
            "catalog.type: expected one of rest, hive, glue, dynamodb, sql, in-memory, bigquery; "
            "found 'bogus'",
        ),
    ],
)
def test_iceberg_output_mistakes_are_named(output: dict[str, Any], expected: str) -> None:
    assert expected in spec_error(with_value("output", output))


@pytest.mark.parametrize("command", ["validate", "run", "query"])
def test_an_iceberg_spec_without_pyiceberg_exits_2_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command
) -> None:
    """A machine without PyIceberg: the spec of an Iceberg table parses (a machine that only
    submits it need not have PyIceberg; the catalog type is checked where it is there), and
    `validate`, `run` and `query` exit 2 naming the extra before any work (the spec's parsing
    failed with ModuleNotFoundError, exit 1)."""
    import json
    import sys

    from vision_ops.cli import EXIT_BAD_SPEC, main

    for module in ("pyiceberg", "pyiceberg.catalog"):
        monkeypatch.setitem(sys.modules, module, None)  # as an import finds it: not there
    spec = with_value("output", ICEBERG_OUTPUT) | {"input": {"uris": [str(tmp_path)]}}
    assert parse_spec(spec).output.format == "iceberg"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(spec))
    assert main([command, str(spec_file)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert (
        err == "error: output.format: iceberg needs PyIceberg: pip install 'vision-ops[iceberg]'\n"
    )


@pytest.mark.parametrize(
    "name",
    ["credential", "token", "s3.secret-access-key", "s3.access-key-id", "adls.sas-token"],
)
def test_iceberg_catalog_credentials_are_refused_without_echo(name: str) -> None:
    catalog = {**ICEBERG_OUTPUT["catalog"], name: "hunter2-secret"}  # type: ignore[dict-item]
    message = spec_error(with_value("output", {**ICEBERG_OUTPUT, "catalog": catalog}))
    assert f"catalog.{name} looks like a credential" in message
    assert "hunter2" not in message


def test_iceberg_catalog_uri_with_a_password_is_refused() -> None:
    catalog = {"type": "sql", "uri": "postgresql://user:hunter2@db/catalog"}
    message = spec_error(with_value("output", {**ICEBERG_OUTPUT, "catalog": catalog}))
    assert "catalog.uri: a URI with credentials in it" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("task", "evaluate", "message"),
    [
        (
            None,
            {"truth": "s3://l/holdout.csv", "min": {"acuracy": 0.8}},
            "evaluate.min names acuracy: expected one of accuracy, top5_accuracy, evaluated",
        ),
        (  # only the floors this spec can hold: no top-5 of a top-3 run, none on error rows
            {"kind": "classification", "top_k": 3},
            {"truth": "s3://l/holdout.csv", "min": {"f1": 0.5}},
            "evaluate.min names f1: expected one of accuracy, evaluated",
        ),
        (
            None,
            {"truth": "s3://l/truth.json", "truth_format": "coco"},
            "evaluate.truth_format: a classification run is scored against table or "
            "imagefolder, found coco",
        ),
        (
            {"kind": "detection"},
            {"truth": "s3://l/truth.json", "min": {"accuracy": 0.5}},
            "evaluate.min names accuracy: expected one of map, map_50, evaluated",
        ),
        (
            {"kind": "embedding"},
            {"truth": "s3://l/holdout.csv"},
            "evaluate: embedding runs cannot be scored; remove evaluate",
        ),
        (  # meant "at most 10": a clean run of 0 error rows failed it (exit 5)
            None,
            {"truth": "s3://l/holdout.csv", "min": {"error_rows": 10}},
            "evaluate.min.error_rows: error rows are failures, and a floor on them fails a run "
            "with fewer",
        ),
        (  # a percentage: every night failed it
            None,
            {"truth": "s3://l/holdout.csv", "min": {"accuracy": 80}},
            "evaluate.min.accuracy: 80.0 is no share; expected a value from 0 to 1",
        ),
        (
            {"kind": "detection"},
            {"truth": "s3://l/truth.json", "min": {"map": -0.1}},
            "evaluate.min.map: -0.1 is no share; expected a value from 0 to 1",
        ),
    ],
)
def test_an_evaluate_section_the_task_cannot_score_is_refused_before_the_run(
    task: dict[str, Any] | None, evaluate: dict[str, Any], message: str
) -> None:
    raw = with_value("evaluate", evaluate)
    if task is not None:
        raw["task"] = task
        raw["model"] = {"architecture": "fasterrcnn_mobilenet_v3_large_fpn"}
    assert message in spec_error(raw)


def test_a_top5_floor_is_refused_where_the_run_keeps_fewer_than_five_labels() -> None:
    """With task.top_k 3 what the scorer called top-5 accuracy was top-3's; a floor on it
    passed validation (and is refused now); top_k 5 keeps it."""
    raw = with_value("evaluate", {"truth": "s3://l/holdout.csv", "min": {"top5_accuracy": 0.9}})
    raw["task"] = {"kind": "classification", "top_k": 3}
    assert (
        "evaluate.min.top5_accuracy: a run gives none where task.top_k is 3: each row keeps "
        "fewer than 5 labels; expected no floor on it"
    ) in spec_error(raw)
    raw["task"]["top_k"] = 5
    assert parse_spec(raw).evaluate.min == {"top5_accuracy": 0.9}


@pytest.mark.parametrize("field", ["input.uris", "input.manifest", "output.uri"])
def test_a_uri_of_an_unknown_protocol_is_refused(field: str) -> None:
    value = "bogus://bucket/x"
    message = spec_error(with_value(field, [value] if field == "input.uris" else value))
    assert "bogus://bucket/x: unknown protocol bogus://; expected s3://, gs://, az://" in message


def test_floors_a_run_can_meet_are_kept() -> None:
    raw = with_value(
        "evaluate", {"truth": "s3://l/h.csv", "min": {"accuracy": 1, "evaluated": 500}}
    )
    assert parse_spec(raw).evaluate.min == {"accuracy": 1.0, "evaluated": 500.0}


@pytest.mark.parametrize(
    ("model", "found"),
    [
        ({"architecture": "resnet18", "weights": "IMAGENET1K_V1"}, "IMAGENET1K_V1"),
        ({"architecture": "resnet18"}, "not set"),
        ({"kind": "entrypoint", "entrypoint": "vision_ops.zoo:efficientnet_lite0"}, "not set"),
    ],
)
def test_a_weights_pin_without_a_weights_file_is_refused(model: dict, found: str) -> None:
    """`weights_sha256` is compared with a weights file only: beside an enum name or nothing
    it was never compared, and read as a pin kept."""
    message = spec_error(with_value("model", model | {"weights_sha256": SHA}))
    assert f"model.weights_sha256 pins a weights file; model.weights is {found}: " in message
    kept = with_value("model", {"architecture": "resnet18", "weights": "s3://m/w.pt"})
    kept["model"]["weights_sha256"] = SHA
    assert parse_spec(kept).model.weights_sha256 == SHA


@pytest.mark.parametrize(
    "name", ["header.Authorization", "adls.connection-string", "header.Cookie", "header.X-Api-Key"]
)
def test_a_catalog_header_or_connection_string_is_a_credential(name: str) -> None:
    """A REST catalog sends each `header.*` property as an HTTP header, and an Azure connection
    string holds AccountKey=: the spec, shipped with a submitted job, would carry them."""
    catalog = {"type": "rest", "uri": "https://cat.example", name: f"Bearer {TOKEN}"}
    output = {"format": "iceberg", "uri": "s3://out/x", "table": "ns.t", "catalog": catalog}
    message = spec_error(with_value("output", output))
    assert f"catalog.{name} looks like a credential" in message and TOKEN not in message
    catalog = {"type": "rest", "uri": "https://c", "header.X-Iceberg-Access-Delegation": "vended"}
    assert parse_spec(with_value("output", output | {"catalog": catalog})).output.catalog


@pytest.mark.parametrize("extension", ["*.png", ".ome.tif", "img/.png", "[jp]g"])
def test_an_extension_that_would_match_no_name_is_refused(extension: str) -> None:
    message = spec_error(with_value("input.extensions", [".jpg", extension]))
    assert f"input.extensions: {extension!r}: expected a file extension such as .jpg" in message


def test_a_list_as_a_yaml_key_is_a_spec_error_naming_its_line(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == (
        f"spec file {path}: not valid YAML: found a list or mapping as a key at line 2, column 5"
    )


def test_every_field_of_every_section_is_described() -> None:
    """The house rule (config is data, every field described): `validate`'s messages and the
    spec's JSON schema tell a user what each field means."""
    import inspect

    from vision_ops import tasks

    undescribed = [
        f"{model.__name__}.{name}"
        for module in (config, tasks)
        for model in vars(module).values()
        if inspect.isclass(model)
        and issubclass(model, pydantic.BaseModel)
        and model.__module__ == module.__name__
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undescribed == []


def test_a_model_section_without_a_kind_is_the_tasks_default_models() -> None:
    """An OCR job's `model: {dictionary: ...}` (README: the model defaults to ppocr, and
    `model.dictionary` names another) is the ppocr model with that dictionary: it was read as
    a torchvision model ("model.architecture: Field required"). A task without a default model
    still reads a kind-less section as torchvision."""
    raw = minimal() | {"task": {"kind": "ocr"}, "model": {"dictionary": "/m/keys.txt"}}
    model = parse_spec(raw).model
    assert (model.kind, model.dictionary) == ("ppocr", "/m/keys.txt")
    assert parse_spec(minimal()).model.kind == "torchvision"
    wrong = minimal() | {"task": {"kind": "ocr"}, "model": {"architecture": "resnet50"}}
    assert "model.kind: task ocr runs model.kind ppocr; found torchvision" in spec_error(wrong)


def test_a_misspelt_field_of_a_kindless_ocr_model_is_named_as_ppocrs() -> None:
    """`model: {detecter: ...}` in an OCR job is a ppocr section with a misspelt field (it was
    read as torchvision's and asked for an `architecture`)."""
    raw = minimal() | {"task": {"kind": "ocr"}, "model": {"detecter": "s3://m/det.onnx"}}
    assert spec_error(raw).splitlines()[1:] == [
        "  model.detecter: Extra inputs are not permitted (found: 's3://m/det.onnx')"
    ]
