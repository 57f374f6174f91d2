"""The checked-in generated modules match the .proto sources, and the contract passes buf lint."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "client" / "nexus_client" / "v1"
BUF_DIR = ROOT / ".cache" / "buf"
BUF_INSTALL = f"npm install --no-save --prefix {BUF_DIR} @bufbuild/buf"


def _buf() -> str:
    """Path of a buf binary: the repo cache (scripts/install_system_deps.sh), PATH, or install it.

    A missing buf is installed, never skipped: an unlinted contract must not pass CI.
    """
    cached = BUF_DIR / "node_modules" / ".bin" / "buf"
    if cached.exists():
        return str(cached)
    on_path = shutil.which("buf")
    if on_path:
        return on_path
    if shutil.which("npm") is None:
        pytest.fail(f"buf is not installed and npm is missing: install node/npm, then `{BUF_INSTALL}`")
    proc = subprocess.run(BUF_INSTALL.split(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not cached.exists():
        pytest.fail(f"could not install buf with `{BUF_INSTALL}`:\n{proc.stdout}\n{proc.stderr}")
    return str(cached)


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "v1"
    subprocess.run([str(ROOT / "scripts" / "gen_proto.sh"), str(out)], check=True, timeout=60)
    generated = sorted(p.name for p in out.iterdir())
    checked_in = sorted(p.name for p in GEN.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    assert generated == checked_in, "run scripts/gen_proto.sh: generated file set differs"
    _, mismatch, errors = filecmp.cmpfiles(out, GEN, generated, shallow=False)
    assert not errors
    assert not mismatch, f"stale generated files {mismatch}: run scripts/gen_proto.sh and commit"


def test_stubs_import_package_relative() -> None:
    from nexus_client.v1 import sidecar_pb2, sidecar_pb2_grpc

    text = (GEN / "sidecar_pb2_grpc.py").read_text()
    assert "from nexus_client.v1 import sidecar_pb2" in text
    assert "from nexus.v1 import" not in text
    # The descriptor keeps the proto's own path (what reflection serves).
    assert sidecar_pb2.DESCRIPTOR.name == "nexus/v1/sidecar.proto"
    assert sidecar_pb2.DESCRIPTOR.package == "nexus.v1"
    assert hasattr(sidecar_pb2_grpc, "EvictionServiceStub")


def test_contract_shape() -> None:
    from nexus_client.v1 import sidecar_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["EvictionService"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in svc.methods}
    assert methods == {
        name: (f"{name}Request", f"{name}Response")
        for name in ("OpenSession", "Step", "StepBatch", "CloseSession", "GetSession", "ListPolicies", "Resync")
    }
    step = pb.SessionStep.DESCRIPTOR.fields_by_name
    assert step["step"].type == step["step"].TYPE_UINT64
    for name in ("new_positions", "attn", "last", "edge_index", "edge_weight"):
        assert step[name].message_type.name == "Tensor"
    assert pb.StepRequest.DESCRIPTOR.fields_by_name["steps"].is_repeated
    # "unset = server default" needs presence on the numeric config fields.
    cfg = pb.PolicyConfig()
    assert not cfg.HasField("budget") and not cfg.HasField("tau")
    cfg.tau = 0.0
    assert cfg.HasField("tau")


def test_buf_lint_passes() -> None:
    proc = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_lint_can_fail(tmp_path: Path) -> None:
    # Guard against a lint config that checks nothing: a non-STANDARD enum must be reported.
    (tmp_path / "proto" / "nexus" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "proto" / "nexus" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage nexus.v1;\nenum Color { RED = 0; }\n'
    )
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [_buf(), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode != 0
    assert 'should be suffixed with "_UNSPECIFIED"' in proc.stdout + proc.stderr
