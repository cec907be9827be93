"""The committed generated protobuf/gRPC code must match the .proto sources."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "proto" / "tideflow" / "api" / "v1"


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "tideflow_proto_generate", ROOT / "proto" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generator = _load_generator()
    written = generator.generate(tmp_path)  # type: ignore[attr-defined]
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in COMMITTED.glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make gen-protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code in {stale}: run `make gen-protos` and commit"
