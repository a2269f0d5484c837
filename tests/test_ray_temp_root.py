"""The suite's Ray temp root: Ray's own rules find it, child processes inherit it, and the
session-end check names what appeared in the host's default root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ray_temp_root import SHORT_BASE, claim, default_ray_root, short_temp_dir

RAY_DEFAULT_ROOT = "from ray._common.utils import get_default_ray_temp_dir as d; print(d())"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"RAY_TMPDIR": "/a", "TMPDIR": "/b"}, "/a/ray"),
        ({"TMPDIR": "/b"}, "/b/ray"),
        ({}, "/tmp/ray"),
    ],
)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TMPDIR counts on Linux only")
def test_the_default_root_follows_rays_own_rules(monkeypatch, environ, expected) -> None:
    from ray._common.utils import get_default_ray_temp_dir

    for name in ("RAY_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert default_ray_root(dict(environ)) == Path(expected)
    assert get_default_ray_temp_dir() == expected


def test_every_child_process_of_the_session_uses_the_suites_root() -> None:
    suite = Path(os.environ["RAY_TMPDIR"])
    assert suite.parent == Path(SHORT_BASE) and suite.name.startswith("vo")
    child = subprocess.run(
        [sys.executable, "-c", RAY_DEFAULT_ROOT], capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == str(suite / "ray")
    assert (suite / "ray").is_dir()  # where a Cluster writes its address file


def test_a_new_host_root_is_a_stray_write(tmp_path) -> None:
    environ = {"TMPDIR": str(tmp_path)}
    root = claim(environ)
    try:
        assert environ["RAY_TMPDIR"] == str(root.path) and root.default_root.is_dir()
        assert root.host_root == tmp_path / "ray" and root.host_entries is None
        assert root.stray_entries() == []
        (tmp_path / "ray").mkdir()
        assert root.stray_entries() == [str(tmp_path / "ray")]
    finally:
        root.release()
    assert not root.path.exists()


def test_only_what_appeared_in_an_existing_host_root_is_a_stray_write(tmp_path) -> None:
    (tmp_path / "ray" / "session_old").mkdir(parents=True)
    root = claim({"RAY_TMPDIR": str(tmp_path)})
    try:
        assert root.host_entries == {"session_old"}
        (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")
        assert root.stray_entries() == [str(tmp_path / "ray" / "ray_current_cluster")]
    finally:
        root.release()


def test_the_shared_host_root_is_told_from_a_private_one(tmp_path) -> None:
    """What appears in /tmp/ray while the suite runs may be another user's Ray (named, not
    failed); in a TMPDIR of the suite's run's own it can only be the suite's (failed)."""
    for environ, shared in [({}, True), ({"TMPDIR": str(tmp_path)}, False)]:
        root = claim(environ)
        try:
            assert root.host_root_is_shared is shared
        finally:
            root.release()


START_A_CLUSTER = """
import ray
ray.init(num_cpus=1, include_dashboard=False)
assert ray.get(ray.remote(lambda: 7).remote()) == 7
ray.shutdown()
"""


def test_a_new_local_cluster_writes_nothing_to_home(tmp_path) -> None:
    """Ray turns token authentication on for a new local cluster and saves the token it makes
    to ~/.ray/auth_token; the suite's processes find the suite's token and leave HOME alone."""
    assert Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    home, ray_root = tmp_path / "home", short_temp_dir("vot")
    home.mkdir()
    try:
        child = subprocess.run(
            [sys.executable, "-c", START_A_CLUSTER],
            # Ray's own default (token auth for a new local cluster): the suite's process has
            # RAY_AUTH_MODE=token from its cluster's ray.init, which would hide Ray's choice.
            env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
            | {"HOME": str(home), "RAY_TMPDIR": str(ray_root)},
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "Token authentication is enabled" in child.stderr  # Ray's default, token in use
    assert sorted(p.name for p in home.rglob("*")) == []
