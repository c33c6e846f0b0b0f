"""The GPU first-contact driver (benchmarks/gpu_check.py), rehearsed on a
machine without a GPU, and its parsers of pytest and compute-sanitizer
output."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import parse_pytest, parse_sanitizer

ROOT = Path(__file__).resolve().parents[1]


def test_rehearsal_writes_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--work",
         str(tmp_path / "work"), "--rehearse", "--steps", "versions,tests,sanitize,bench"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json", "bench.png", "logs.tar.gz", "summary.json", "summary.txt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["versions"]["torch"]
    steps = summary["steps"]
    assert list(steps) == ["versions", "tests", "sanitize", "bench"]
    # Every first-contact case is collected, and skipped only for want of a GPU.
    first = steps["tests"]["first_contact"]["counts"]
    assert set(first) == {"SKIPPED"} and first["SKIPPED"] > 300
    assert steps["sanitize"]["cases"] > 20
    assert steps["bench"]["bench"]["cases"] > 0
    assert "ALL PASSED" in proc.stdout


def test_step_past_deadline_is_skipped(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--work",
         str(tmp_path / "work"), "--rehearse", "--steps", "versions", "--deadline", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["versions"]["status"] == "skipped" and not summary["ok"]


def test_parse_pytest_plain_xdist_and_cut_short():
    text = "\n".join([
        "tests/test_a.py::test_x[cuda-f32] PASSED                     [ 10%]",
        "tests/test_a.py::test_x[cuda-f16] FAILED                     [ 20%]",
        "[gw1] [ 30%] SKIPPED tests/test_b.py::test_y[cuda] ",
        "[gw0] [ 40%] ERROR tests/test_b.py::test_z ",
        "tests/test_c.py::test_w",  # started, killed before its outcome
    ])
    r = parse_pytest(text)
    assert r["counts"] == {"PASSED": 1, "FAILED": 1, "SKIPPED": 1, "ERROR": 1}
    assert r["failed"] == ["tests/test_a.py::test_x[cuda-f16]", "tests/test_b.py::test_z"]


def test_parse_sanitizer_summaries():
    clean = "ok case\n========= ERROR SUMMARY: 0 errors\n"
    assert parse_sanitizer(clean)["errors"] == 0
    dirty = ("========= Invalid __global__ read of size 16 bytes\n"
             "=========     at stats_planar_kernel+0x1c0\n"
             "========= ERROR SUMMARY: 3 errors\n")
    r = parse_sanitizer(dirty)
    assert r["errors"] == 3 and "Invalid __global__ read" in r["first"][0]
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert parse_sanitizer(race)["errors"] == 2
    # A run that never printed a summary did not finish: no count to trust.
    assert parse_sanitizer("Traceback ...\n")["errors"] is None
