"""The suite's own Ray temp root: no test depends on what earlier Ray processes left on the host.

Ray keeps its address file (`ray_current_cluster`) and the sessions of nodes started without a
temp dir under its default root: `$RAY_TMPDIR/ray`, else `$TMPDIR/ray` (Linux), else
`/tmp/ray`. A brand-new machine has no such folder (a `ray.cluster_utils.Cluster` then dies
writing its address file) and a used one may hold a stale address that a later `ray.init()`
tries to join. So, before any Ray process starts, the suite points RAY_TMPDIR at a new folder
of its own (every child process inherits it), creates the `ray` folder in it, and checks at
the end that the host's default root was left as it was.

A new local cluster also turns on Ray's token authentication, and Ray writes the token it makes
to `~/.ray/auth_token` (an unwritable HOME fails every Ray test). The suite's token is a file
in its own folder (RAY_AUTH_TOKEN_PATH), so Ray finds one and writes nothing to HOME.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

# Short: Ray's unix socket paths (at most 107 bytes) nest a session name and more below a root.
SHORT_BASE = "/tmp"
# The root every user and tool on a Linux or macOS host shares when neither variable is set.
SHARED_ROOT = Path("/tmp/ray")


def default_ray_root(environ: MutableMapping[str, str]) -> Path:
    """Ray's default temp root in this environment (ray._common.utils' rules)."""
    if "RAY_TMPDIR" in environ:
        return Path(environ["RAY_TMPDIR"], "ray")
    if sys.platform.startswith("linux") and "TMPDIR" in environ:
        return Path(environ["TMPDIR"], "ray")
    if sys.platform.startswith(("linux", "darwin")):
        return Path("/tmp/ray")
    return Path(tempfile.gettempdir(), "ray")


def entries(folder: Path) -> frozenset[str] | None:
    """The names in a folder, None where there is no folder."""
    return frozenset(os.listdir(folder)) if folder.is_dir() else None


@dataclass(frozen=True)
class SuiteRayRoot:
    """What RAY_TMPDIR points at for the session, and the host's root it replaced."""

    path: Path
    host_root: Path
    host_entries: frozenset[str] | None  # before the suite started; None: no folder

    @property
    def default_root(self) -> Path:
        """Ray's default root while the suite runs (the address file goes here)."""
        return self.path / "ray"

    @property
    def host_root_is_shared(self) -> bool:
        """Another user's or tool's Ray may write there while the suite runs (no TMPDIR)."""
        return self.host_root == SHARED_ROOT

    def stray_entries(self) -> list[str]:
        """What appeared in the host's default root since the session started."""
        now = entries(self.host_root)
        if now is None:
            return []
        if self.host_entries is None:
            return [str(self.host_root)]
        return sorted(str(self.host_root / name) for name in now - self.host_entries)

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def short_temp_dir(prefix: str) -> Path:
    """A new folder short enough for a Ray temp dir (pytest's tmp_path is too long)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SHORT_BASE))


def claim(environ: MutableMapping[str, str]) -> SuiteRayRoot:
    """A new Ray temp root with its `ray` folder and an auth token, set as RAY_TMPDIR and
    RAY_AUTH_TOKEN_PATH in `environ`."""
    host_root = default_ray_root(environ)
    path = short_temp_dir("vo")
    (path / "ray").mkdir()
    root = SuiteRayRoot(path=path, host_root=host_root, host_entries=entries(host_root))
    environ["RAY_TMPDIR"] = str(path)
    token = path / "auth_token"
    token.write_text(secrets.token_hex(32))  # as Ray makes one
    token.chmod(0o600)
    environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    return root
