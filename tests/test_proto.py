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


def test_a_policy_of_another_version_is_refused_both_ways() -> None:
    """Blooms of another gram hash would make searches miss files silently: a client refuses a server's
    forest of another policy version, and a server refuses rows built by another version."""
    import pytest

    from sspry.policy import POLICY_VERSION, Policy, PolicyError
    from sspry.v1 import sspry_pb2
    from sspry.wire import RowAssembler, WireError, policy_from_proto, policy_to_proto, row_frames

    message = policy_to_proto(Policy())
    assert message.version == POLICY_VERSION and policy_from_proto(message) == Policy()
    message.version = 0  # a server before version 2 does not send one
    with pytest.raises(PolicyError, match=f"before {POLICY_VERSION}"):
        policy_from_proto(message)
    row = sspry_pb2.DocumentRow(source_id=b"\x01" * 32)
    (frame,) = row_frames([row], 4 << 20)
    assembler = RowAssembler(1 << 20)
    assembler.add(frame)
    assert assembler.finish() == [row]
    frame.version = POLICY_VERSION - 1
    with pytest.raises(WireError, match="run the same sspry version"):
        RowAssembler(1 << 20).add(frame)
