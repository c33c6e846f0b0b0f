"""The benchmark harness runs end to end and records what it measured.
No timing is asserted: speed lives in benchmarks/, not in tests."""

import json

import pytest

from conftest import requires_bnext_cuda

bench = pytest.importorskip("benchmarks.bench")


def test_harness_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    bench.main(["--quick", "--no-compile", "--batch", "2", "--repeats", "1", "--min-time", "0.001",
                "--dtypes", "fp32", "--shapes", "7x7,(N, C)", "--malloc", "default",
                "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["machine"]["threads"] >= 1
    rows = data["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd", "eval"}
    assert {r["layout"] for r in rows} == {"contiguous", "channels_last"}
    for r in rows:
        assert set(r["ms"]) == {"copy", "torch", "bnext"}
        assert all(v > 0 for v in r["ms"].values())
        assert r["speedup_vs_torch"] > 0 and r["copies"]["bnext"] > 0
    assert (tmp_path / "smoke.png").stat().st_size > 0


@requires_bnext_cuda
def test_harness_smoke_cuda(tmp_path):
    out = tmp_path / "smoke_cuda.json"
    bench.main(["--device", "cuda", "--quick", "--no-compile", "--batch", "2", "--repeats", "1",
                "--dtypes", "fp16", "--shapes", "7x7", "--malloc", "default", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["gpu"] and data["machine"]["cuda"]
    for r in data["results"]:
        assert r["torch_backend"] in {"cudnn", "native"}
        assert all(v > 0 for v in r["ms"].values())


def test_shape_set_covers_resnet50_and_extras():
    from benchmarks.shapes import RESNET50_CHW, shape_set

    shapes = dict(shape_set(32))
    assert len(RESNET50_CHW) == len(set(RESNET50_CHW)) == 12
    assert {len(s) for s in shapes.values()} == {2, 3, 4, 5}
    assert all(s[0] == 32 for n, s in shapes.items() if n.startswith("resnet50"))


def test_fused_harness_smoke(tmp_path):
    out = tmp_path / "fused.json"
    bench.main(["--fused", "relu", "--no-compile", "--batch", "2", "--repeats", "1",
                "--min-time", "0.001", "--dtypes", "fp32", "--modes", "fwdbwd",
                "--shapes", "7x7", "--malloc", "default", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["fused"] == "relu"
    assert {r["case"] for r in data["results"]} == {"resnet50 512x7x7", "resnet50 2048x7x7"}


def test_memory_benchmark_smoke(tmp_path):
    memory = pytest.importorskip("benchmarks.memory")
    out = tmp_path / "memory.json"
    memory.main(["--batch", "2", "--size", "8", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    by = {(r["activation"], r["variant"]): r for r in rows}
    torch_leaky = by[("leaky_relu", "torch (Conv, BatchNorm2d, leaky_relu)")]
    saving = by[("leaky_relu", "bnext fused, memory_saving")]
    # Bytes kept for backward are deterministic (no timing): memory_saving
    # must keep at least 30% fewer than torch's Conv/BN/LeakyReLU network.
    assert saving["saved_activation_bytes"] <= 0.7 * torch_leaky["saved_activation_bytes"]
