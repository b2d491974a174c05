"""The generated protobuf/gRPC stubs committed in sspry/v1 are what the .proto gives today."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path) -> None:
    status = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / "sspry" / "v1" / "sspry.proto"),
        ]
    )
    assert status == 0
    for name in ("sspry_pb2.py", "sspry_pb2_grpc.py"):
        fresh = (tmp_path / "sspry" / "v1" / name).read_text()
        committed = (ROOT / "sspry" / "v1" / name).read_text()
        assert committed == fresh, f"sspry/v1/{name} is stale: run `make proto`"
