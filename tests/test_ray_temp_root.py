"""The suite's Ray temp root: Ray's own rules find it, child processes inherit it, and the
session-end check names what appeared in the host's default root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_temp_root import SHORT_BASE, claim, default_ray_root

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
