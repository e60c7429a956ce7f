"""Run-root storage and secrets: paths cannot escape the root; credentials never reach disk. (The
checks that run the pipeline, a refused run and a corrupted artifact: tests/integration/test_storage_runs.py.)"""

from __future__ import annotations

import contextlib

import pytest

from spice_ray.config import redact
from spice_ray.storage import Store, ensure_local


def test_paths_cannot_escape_the_root(tmp_path):
    store = Store(str(tmp_path / "root"))
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\\..\\b"):
        with pytest.raises(ValueError, match="escape"):
            store.path(bad)
    store.write_text("a/b.txt", "hi")
    assert store.read_text("a/b.txt") == "hi" and store.exists("a/b.txt")
    assert not list((tmp_path / "root" / "a").glob(".tmp-*"))  # atomic write left no temp file
    store.copy("a/b.txt", "c/d.txt")
    assert (tmp_path / "root" / "c" / "d.txt").read_text() == "hi"
    assert ensure_local(str(tmp_path)) == str(tmp_path)  # local paths and hub ids pass through
    assert ensure_local("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"


def test_redact_masks_credentials():
    data = {
        "root": "s3://AKIAXXX:s3cr3t@bucket/run",
        "addr": "http://h:8265/?token=abc&x=1",
        "hf_token": "hf_abc",
        "aws_secret_access_key": "zzz",
        "n": 3,
        "paths": ["gs://user:pw@b/x", "/plain/path"],
    }
    out = redact(data)
    text = repr(out)
    for secret in ("s3cr3t", "AKIAXXX", "abc", "hf_abc", "zzz", "pw@"):
        assert secret not in text
    assert out["n"] == 3 and out["paths"][1] == "/plain/path" and out["root"].endswith("@bucket/run")


def test_an_unreachable_s3_endpoint_fails_in_seconds_with_one_line(monkeypatch):
    import socket
    import time

    from spice_ray.storage import StorageError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
                        "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    t0 = time.time()
    with pytest.raises(StorageError, match="run root s3://bucket/root cannot be used") as err:
        Store("s3://bucket/root")
    assert time.time() - t0 < 30 and "\n" not in str(err.value)


def _s3_env(monkeypatch, port: int) -> None:
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
                        "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


def test_s3_roots_get_connect_and_request_timeouts(monkeypatch):
    """Every S3 filesystem gets the connect and request (no-answer) timeouts; an endpoint that accepts
    connections and never answers costs 2 tries × attempts × request timeout (the SDK resends a
    request that timed out once per attempt): the limits keep that within a minute."""
    from spice_ray import storage

    _s3_env(monkeypatch, 9)
    fs, path = storage.resolve_filesystem("s3://bucket/root")
    options = fs.__reduce__()[1][0]  # the keywords pyarrow rebuilds the filesystem from
    assert path == "bucket/root" and options["endpoint_override"] == "127.0.0.1:9"
    assert options["connect_timeout"] == storage.S3_CONNECT_TIMEOUT_S
    assert options["request_timeout"] == storage.S3_REQUEST_TIMEOUT_S
    assert 2 * storage.S3_ATTEMPTS * storage.S3_REQUEST_TIMEOUT_S <= 60


def test_a_silent_s3_endpoint_fails_with_one_line_naming_it(monkeypatch):
    """An endpoint that accepts TCP and never answers (a blackhole): a StorageError of one line that
    says nothing answered, names the endpoint and the limits (short limits here, to keep it quick)."""
    import socket
    import threading

    from spice_ray import storage
    from spice_ray.storage import StorageError

    held: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]

        def accept_and_stay_silent() -> None:
            with contextlib.suppress(OSError):
                while True:
                    held.append(server.accept()[0])  # never read, never answered

        threading.Thread(target=accept_and_stay_silent, daemon=True).start()
        _s3_env(monkeypatch, port)
        monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
        monkeypatch.setattr(storage, "S3_ATTEMPTS", 1)
        with pytest.raises(StorageError, match="run root s3://bucket/root cannot be used") as err:
            Store("s3://bucket/root")
    for conn in held:
        conn.close()
    message = str(err.value)
    assert held and "\n" not in message
    assert f"no answer from http://127.0.0.1:{port} within 1 s (1 attempt;" in message


def test_uri_filesystem_gives_s3_the_timeouts_and_opens_other_uris(monkeypatch, tmp_path):
    """Every URI outside storage.py is opened through ``uri_filesystem``: S3 gets the timeouts that
    a bare ``FileSystem.from_uri`` would skip; other schemes (file://) open as pyarrow opens them."""
    import pyarrow.fs as pafs

    from spice_ray import storage

    _s3_env(monkeypatch, 9)
    fs, path = storage.uri_filesystem("s3://bucket/x")
    assert path == "bucket/x" and fs.__reduce__()[1][0]["request_timeout"] == storage.S3_REQUEST_TIMEOUT_S
    fs, path = storage.uri_filesystem(f"file://{tmp_path}/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a"
    assert storage.is_uri(f"file://{tmp_path}") and storage.is_uri("s3://b/k") and not storage.is_remote(f"file://{tmp_path}")
    assert not storage.is_uri(str(tmp_path)) and not storage.is_uri("Qwen/Qwen2-0.5B") and not storage.is_uri(tmp_path)


def test_directory_renames(tmp_path):
    """publish_once keeps the first writer's directory; replace_dir swaps in a rerun's and leaves
    nothing of the old one; replace_atomically is one rename."""
    from spice_ray.storage import publish_once, replace_atomically, replace_dir

    def a_dir(name: str, text: str):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(text)
        return d

    out = tmp_path / "out"
    assert publish_once(a_dir("t1", "first"), out)
    assert not publish_once(a_dir("t2", "second"), out)
    assert (out / "f").read_text() == "first" and not (tmp_path / "t2").exists()
    replace_dir(a_dir("t3", "rerun"), out)
    assert (out / "f").read_text() == "rerun" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_atomically(a_dir("t4", "new"), tmp_path / "fresh")
    assert (tmp_path / "fresh" / "f").read_text() == "new" and not (tmp_path / "t4").exists()
    with pytest.raises(OSError):
        replace_atomically(a_dir("t5", "x"), out)  # a directory never replaces a non-empty one
