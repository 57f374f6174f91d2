"""Server settings: flags > NEXUS_* environment > file > defaults, redaction, validation, and the
keys file parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nexus_sidecar.server.auth import KeyRing
from nexus_sidecar.server.settings import ServerSettings, load_settings
from pydantic import ValidationError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NEXUS_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    values = {"max_batch": 8, "queue_size": 100, "checkpoint_every": 3, "store_ttl_s": 60.0}
    path = tmp_path / f"sidecar{suffix}"
    if suffix == ".toml":
        path.write_text("\n".join(f"{k} = {v}" for k, v in values.items()) + '\nstore = "redis://file:6379/0"\n')
    else:
        path.write_text(json.dumps({**values, "store": "redis://file:6379/0"}))
    monkeypatch.setenv("NEXUS_MAX_BATCH", "16")
    monkeypatch.setenv("NEXUS_QUEUE_SIZE", "200")
    monkeypatch.setenv("NEXUS_STORE", "redis://env:6379/0")
    s = load_settings(path, max_batch=32, queue_size=None, grpc_port=0)
    assert s.max_batch == 32, "a flag wins over env and file"
    assert s.queue_size == 200, "env wins over the file (a None flag is 'not given')"
    assert s.store == "redis://env:6379/0"
    assert s.checkpoint_every == 3 and s.store_ttl_s == 60.0, "the file wins over defaults"
    assert s.grpc_port == 0
    assert s.max_delay_us == ServerSettings.model_fields["max_delay_us"].default


def test_defaults_without_file_or_env() -> None:
    s = load_settings(None)
    assert s.store == "memory" and s.grpc_port == 50051 and s.keys_file is None


@pytest.mark.parametrize("url,secret", [
    ("redis://user:s3cret-pw@10.0.0.5:6380/2", "s3cret-pw"),
    ("redis://:s3cret-pw@10.0.0.5:6380/0", "s3cret-pw"),
    ("rediss+cluster://admin:s3cret-pw@redis.example:7000", "s3cret-pw"),
])
def test_redacted_hides_the_redis_password(url: str, secret: str) -> None:
    s = ServerSettings(store=url)
    shown = s.redacted()
    assert secret not in json.dumps(shown)
    assert "***" in shown["store"]
    host = url.split("@", 1)[1]
    assert shown["store"].endswith(host), "everything but the password stays visible"
    assert s.store == url, "redaction is for display only"


def test_redacted_keeps_urls_without_password() -> None:
    assert ServerSettings(store="redis://127.0.0.1:6379/0").redacted()["store"] == "redis://127.0.0.1:6379/0"
    assert ServerSettings().redacted()["store"] == "memory"


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "127.0.0.1:6379", "memcached://x", ""])
def test_invalid_store_url_is_rejected_naming_the_field(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        ServerSettings(store=bad)
    assert err.value.errors()[0]["loc"] == ("store",)
    assert "redis://" in str(err.value)


def test_invalid_values_from_env_and_file_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_STORE", "ftp://nope")
    with pytest.raises(ValidationError) as err:
        load_settings(None)
    assert "store" in str(err.value)
    monkeypatch.delenv("NEXUS_STORE")
    path = tmp_path / "c.toml"
    path.write_text("max_batch = 0\n")
    with pytest.raises(ValidationError) as err:
        load_settings(path)
    assert err.value.errors()[0]["loc"] == ("max_batch",)
    path.write_text("no_such_setting = 1\n")
    with pytest.raises(ValidationError) as err:
        load_settings(path)
    assert "no_such_setting" in str(err.value)
    with pytest.raises(ValidationError) as err:
        ServerSettings(device="tpu")
    assert err.value.errors()[0]["loc"] == ("device",)


def test_keys_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n\nacme 0123456789abcdef  # trailing comment\nglobex fedcba9876543210 ro\n")
    ring = KeyRing.from_file(path)
    assert ring.tenants == ["acme", "globex"] and not ring.single_tenant
    assert ring.authenticate("Bearer 0123456789abcdef").can_write
    assert not ring.authenticate("bearer fedcba9876543210").can_write
    for text, why in [("acme short\n", "shorter than 16"), ("acme 0123456789abcdef rx\n", "tenant key"),
                      ("acme\n", "tenant key")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=why) as err:
            KeyRing.from_file(path)
        assert f"{path}:1" in str(err.value)
    path.write_text("a:b 0123456789abcdef\n")
    with pytest.raises(ValueError, match="tenant"):
        KeyRing.from_file(path)
