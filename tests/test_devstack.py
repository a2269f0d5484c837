"""The local S3 server as the demo and the tests use it, from a developer's shell as it may be:
a session token of another key pair and a proxy that does not exempt 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3, use_local_server


def test_the_local_server_environment_drops_other_tokens_and_passes_proxies() -> None:
    environ = {"AWS_SESSION_TOKEN": "sso", "AWS_SECURITY_TOKEN": "old", "no_proxy": "corp.example"}
    environ |= {"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "localhost"}
    use_local_server(environ)
    hosts = "localhost,corp.example,127.0.0.1"  # both spellings: clients read either first
    assert environ == LOCAL_CREDENTIALS | {
        "HTTP_PROXY": "http://proxy.example:3128",
        "NO_PROXY": hosts,
        "no_proxy": hosts,
    }
    use_local_server(environ)  # twice: nothing added twice
    assert environ["NO_PROXY"] == environ["no_proxy"] == hosts


@pytest.mark.s3
def test_the_local_server_answers_from_a_shell_with_a_token_and_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token left by `aws sso login` was signed into every request (InvalidAccessKeyId),
    and HTTP_PROXY took the requests to 127.0.0.1 (the server never answered)."""
    import s3fs

    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-token-of-another-key-pair")
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens on the discard port
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    use_local_server(os.environ)
    assert "AWS_SESSION_TOKEN" not in os.environ
    with SeaweedS3(buckets=("proxied",)) as server:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
        fs.pipe_file("proxied/x.txt", b"through")
        assert fs.cat_file("proxied/x.txt") == b"through"


@pytest.mark.s3
def test_the_server_leaves_no_socket_in_tmp(tmp_path) -> None:
    """`weed mini` made /tmp/seaweedfs-s3-PORT.sock and left it after a clean stop; a later
    server of another user given that port could not replace it. Its S3 and filer sockets are
    in a folder of the server's own, gone with it."""
    before = set(Path("/tmp").glob("seaweedfs-*.sock"))
    with SeaweedS3(buckets=("sockets",), data_dir=tmp_path) as server:
        running = {p.name for p in Path("/tmp").glob("seaweedfs-*.sock")}
        assert f"seaweedfs-s3-{server.ports['s3.port']}.sock" not in running
        assert server._socket_dir is not None
        assert sorted(p.name for p in server._socket_dir.iterdir()) == ["filer.sock", "s3.sock"]
        socket_dir = server._socket_dir
    assert set(Path("/tmp").glob("seaweedfs-*.sock")) - before == set()
    assert not socket_dir.exists()


def test_a_server_that_fails_to_start_leaves_no_socket_folder(tmp_path) -> None:
    """`with` calls no __exit__ where the start raises: the start cleans up what it made
    (its data folder kept where it is the caller's, its log named in the error)."""
    before = set(Path("/tmp").glob("vo-weed-*"))
    missing = tmp_path / "no-such" / "iam.json"  # weed mini exits at once
    server = SeaweedS3(data_dir=tmp_path, iam_config=missing, start_timeout_s=60)
    with pytest.raises(RuntimeError, match=f"weed mini exited early; see {tmp_path}/weed.log"):
        server.start()
    assert set(Path("/tmp").glob("vo-weed-*")) == before
    assert (tmp_path / "weed.log").stat().st_size > 0
