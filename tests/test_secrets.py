"""Secrets and trust: weights load without running pickles, canary credentials leak nowhere,
local Ray starts with token authentication and a loopback-only dashboard."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml
from ray_temp_root import short_temp_dir

from vision_ops.errors import ModelError
from vision_ops.models import load_state_dict_file
from vision_ops.runindex import INDEX_FOLDER

PACKAGE = Path(__file__).parents[1] / "vision_ops"
CANARY_KEY_ID = "AKIACANARY7KEYID0000"
CANARY_SECRET = "canary/Secret+Key/9f8e7d6c5b4a39281706"


class Payload:
    """Pickled into a checkpoint: unpickling it calls open(marker, 'w')."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.fixture
def poisoned(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    checkpoint = {"state_dict": model.state_dict(), "extra": Payload(marker)}
    path = tmp_path / "poisoned.pt"
    torch.save(checkpoint, path)
    return path, marker


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(poisoned, monkeypatch, force_unsafe) -> None:
    path, marker = poisoned
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    module = torchvision.models.mobilenet_v3_small(num_classes=3)
    with pytest.raises(ModelError, match="not a loadable state_dict") as refused:
        load_state_dict_file(module, str(path), None, {})
    assert not marker.exists()
    message = str(refused.value)  # what was found, not torch's advice to load it unsafely
    assert "Unsupported global: GLOBAL io.open" in message and "\n" not in message
    assert "weights_only` set to `False`" not in message and "add_safe_globals" not in message


def test_sha256_mismatch_is_refused_before_unpickling(poisoned) -> None:
    path, marker = poisoned
    module = torchvision.models.mobilenet_v3_small(num_classes=3)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_state_dict_file(module, str(path), "0" * 64, {})
    assert not marker.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() != "0" * 64


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = []
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((source.name, flags.get("weights_only")))
    assert calls and all(flag == "True" for _, flag in calls), calls


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path}: {n.decode()}" for n in needles if n in data]
    return found


@pytest.fixture
def canary_server():  # type: ignore[no-untyped-def]
    """A SeaweedFS of its own whose only credentials are the canary keys."""
    import s3fs

    from vision_ops.devstack import SeaweedS3

    canary = {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET}
    with SeaweedS3(buckets=("images", "out"), credentials=canary) as server:
        client = s3fs.S3FileSystem(
            key=CANARY_KEY_ID,
            secret=CANARY_SECRET,
            skip_instance_cache=True,
            **server.storage_options(),
        )
        yield server, client


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_canary_credentials_appear_nowhere(canary_server, photo_paths, tmp_path) -> None:
    """A full run with failing inputs, canary keys in the environment: not in stdout/stderr,
    Ray's session logs, error rows, Parquet files or the run manifest."""
    seaweed, s3fs_client = canary_server
    for path in photo_paths[:2]:
        s3fs_client.put_file(str(path), f"images/canary/{path.name}")
    s3fs_client.pipe_file("images/canary/broken.jpg", b"\xff\xd8\xff broken jpeg")
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("s3://images/canary/missing.jpg\ns3://no-such-bucket-canary/x.jpg\n")
    spec = {
        "input": {"uris": ["s3://images/canary/"], "manifest": str(manifest)},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "vision_ops.zoo:efficientnet_lite0",
            "preprocessing": {"resize": 64, "crop": 56, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 4},
        "output": {"uri": "s3://out/canary"},
        "storage_options": {"s3": seaweed.storage_options()},
    }
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    ray_temp = short_temp_dir("voc")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET}
    env |= {"RAY_TMPDIR": str(ray_temp)}
    cli = [sys.executable, "-m", "vision_ops.cli"]
    try:
        ran = subprocess.run(
            [*cli, "run", str(spec_file), "--run-id", "canary"],
            env=env, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
        checked = subprocess.run(
            [*cli, "validate", str(spec_file), "--list-inputs"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "run canary: 5 items, 2 ok, 3 errors" in ran.stdout
        needles = [CANARY_KEY_ID.encode(), CANARY_SECRET.encode()]
        for text in (ran.stdout, ran.stderr, checked.stdout, checked.stderr):
            assert not [n for n in needles if n.decode() in text]
        assert any(ray_temp.rglob("*.log")), "no Ray session logs to check"
        assert files_containing(ray_temp, needles) == []
        output = tmp_path / "output"
        s3fs_client.get("out/canary/", str(output), recursive=True)
        assert any(output.rglob("*.parquet")) and any(output.rglob("*.json"))
        assert files_containing(output, needles) == []
        # Decoded: the part files are zstd-compressed, so a byte search alone can miss a leak.
        assert len(list(output.rglob(f"{INDEX_FOLDER}/*.parquet"))) == 1  # searched too
        values = decoded_values(output)
        assert values["rows"] == 5 and values["manifests"] == 1
        assert any("missing.jpg" in v for v in values["strings"])  # the error rows are read
        assert canaries_in(values["strings"]) == []
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def strings_of(value: object) -> Iterator[str]:
    """Every string (and bytes, decoded) inside a row value or a JSON document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_of(key)
            yield from strings_of(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_of(item)


def decoded_values(output: Path) -> dict[str, Any]:
    """Every value of every row of the table's Parquet files (its part files, and its runs'
    indexes), and of its manifests, decoded; the part files' rows counted."""
    strings: list[str] = []
    rows = 0
    for path in output.rglob("*.parquet"):
        table = pq.read_table(path)
        rows += 0 if INDEX_FOLDER in path.parts else table.num_rows
        for row in table.to_pylist():
            strings += strings_of(row)
    manifests = list(output.rglob("_manifests/*.json"))
    for path in manifests:
        strings += strings_of(json.loads(path.read_text()))
    return {"rows": rows, "manifests": len(manifests), "strings": strings}


def canaries_in(strings: list[str]) -> list[str]:
    return [s for s in strings if CANARY_KEY_ID in s or CANARY_SECRET in s]


def test_decoded_search_finds_what_a_byte_search_of_zstd_parquet_misses(tmp_path) -> None:
    """The control: a canary in a zstd-compressed row is invisible to a byte search and found
    by the decoded one."""
    messages = [f"error {i:04d}: access denied for s3://images/{i}.jpg" for i in range(400)]
    message = messages[200] = f"error 0200: denied for {CANARY_KEY_ID} ({CANARY_SECRET})"
    table = pa.table({"error_message": messages, "top_k": [[{"label": "ok"}]] * 400})
    pq.write_table(table, tmp_path / "part.parquet", compression="zstd")  # as the sink writes
    assert files_containing(tmp_path, [CANARY_KEY_ID.encode(), CANARY_SECRET.encode()]) == []
    assert canaries_in(decoded_values(tmp_path)["strings"]) == [message]


LOCAL_RAY_PROBE = """
import json, os, sys
import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from vision_ops.pipeline import connect_ray
connect_ray(dashboard=sys.argv[1] == "dashboard")
context = ray.get_runtime_context()
print(json.dumps({"token": is_token_auth_enabled(),
                  "dashboard": ray._private.worker.global_worker.node.address_info["webui_url"]}))
ray.shutdown()
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dashboard", ["dashboard", "none"])
def test_local_ray_uses_token_auth_and_a_loopback_dashboard_if_any(dashboard: str) -> None:
    """The embedded cluster: token authentication; no dashboard unless the spec asks for one
    (`runtime.local_dashboard`), and that one on loopback only."""
    ray_temp = short_temp_dir("vot")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = str(ray_temp)
    try:
        done = subprocess.run(
            [sys.executable, "-c", LOCAL_RAY_PROBE, dashboard],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["token"] is True
    if dashboard == "none":
        assert result["dashboard"] in ("", None)
    else:  # ray[default] is installed: the dashboard starts, on loopback only
        assert result["dashboard"].startswith("127.0.0.1:"), result
