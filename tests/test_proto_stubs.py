"""The committed stubs in guard/v1 are exactly what grpc_tools.protoc makes of the proto."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("guard_pb2.py", "guard_pb2.pyi", "guard_pb2_grpc.py")


def test_stubs_match_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # protoc writes paths relative to -I into the stubs' imports and error messages: run it
    # from the repository root with the same arguments as the documented command.
    monkeypatch.chdir(ROOT)
    # `python -m grpc_tools.protoc` appends the bundled include dir (struct.proto) last.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        "-I",
        "proto",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        "proto/guard/v1/guard.proto",
        f"-I{well_known}",
    ]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "guard" / "v1" / name).read_bytes()
        committed = (ROOT / "guard" / "v1" / name).read_bytes()
        assert fresh == committed, f"guard/v1/{name} is stale: regenerate it from the proto"
