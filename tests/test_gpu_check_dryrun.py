"""``benchmarks/gpu_check.sh OUT --dry-run``: the GPU check's code runs on CPU with tiny shapes, every table is
written as JSON + markdown with its columns and rows, and bad arguments stop it with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# minutes on 2 cores, so run by hand (gpu_check.sh OUT --dry-run): the tiny ssl_benchmark (test_benchmark runs the
# same command end to end) and the pretraining workers (each imports every method; pretrain_throughput is H3's)
SKIPPED = ["ssl_benchmark", "pretrain"]
TABLES = {  # table: columns that must be there
    "summary": ["section", "status", "seconds", "limit_s", "note"],
    "environment": ["key", "value"],
    "pytest_gpu": ["test", "outcome", "seconds", "message"],
    "sparse_conv": ["shape", "dtype", "ratio", "backend", "resolved", "fwd_ms", "fwd_bwd_ms", "peak_gib",
                    "vs_dense_masked", "vs_dense", "note"],
    "encoder": ["encoder", "dtype", "ratio", "backend", "fwd_bwd_ms", "peak_gib", "conv_dtype", "note"],
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    env.update(PYTHON=sys.executable, TRITON_INTERPRET="0")  # the interpreter takes seconds per launch
    r = subprocess.run(["bash", str(SCRIPT), str(root / "out"), "--dry-run", "--skip", *SKIPPED,
                        "--bundle", str(root / "bundle.tar.gz")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    return root, r


def _table(out: Path, name: str) -> dict:
    assert (out / f"{name}.md").is_file(), f"{name}.md missing"
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow  # the dry run: about a minute on 2 cores
def test_every_section_runs_and_every_table_is_written(dry_run):
    root, r = dry_run
    out = root / "out"
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = _table(out, "summary")
    status = {row["section"]: row["status"] for row in summary["rows"]}
    assert set(status) == {"environment", "pytest_gpu", "encoder",
                           *(f"sparse_conv.{b}" for b in ("dense", "dense-masked", "gather", "triton", "auto"))}
    assert set(status.values()) == {"ok"}, status
    for name, columns in TABLES.items():
        t = _table(out, name)
        assert t["columns"] == columns, name
        assert t["rows"] and all(set(row) == set(columns) for row in t["rows"]), name
    assert (root / "bundle.tar.gz").stat().st_size > 0
    assert (out / "report.md").read_text(encoding="utf-8").count("\n## ") >= 5


@pytest.mark.slow  # the dry run: about a minute on 2 cores
def test_tables_hold_measurements(dry_run):
    out = dry_run[0] / "out"
    env = {row["key"]: row["value"] for row in _table(out, "environment")["rows"]}
    assert env["torch"] and env["triton"] and env["dry_run"] is True and "gather" in env["sparse_backends"]
    conv = _table(out, "sparse_conv")["rows"]
    timed = {(row["backend"], row["ratio"]) for row in conv if row["fwd_bwd_ms"] and row["fwd_ms"]}
    assert {(b, r) for b in ("dense-masked", "gather", "auto") for r in (0.0, 0.5, 0.75, 0.9)} <= timed
    assert ("dense", None) in timed and all(row["vs_dense_masked"] > 0 for row in conv if row["backend"] == "gather")
    assert [row["note"] for row in conv if row["backend"] == "triton"] == [
        "skipped: no GPU and the Triton interpreter is not active (TRITON_INTERPRET=1 before triton's import)"]
    enc = _table(out, "encoder")["rows"]
    assert {row["backend"] for row in enc if row["fwd_bwd_ms"]} == {"dense", "dense-masked", "gather", "auto"}
    assert {row["conv_dtype"] for row in enc if row["dtype"] == "bf16-autocast" and row["fwd_bwd_ms"]} == {"bfloat16"}
    tests = _table(out, "pytest_gpu")["rows"]
    assert tests and all(row["outcome"] in ("passed", "skipped") for row in tests)
    assert sum(row["outcome"] == "passed" for row in tests) >= 10


def test_bad_arguments_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, msg in [([str(tmp_path / "file")], "exists and is not a folder"),
                      ([str(tmp_path / "o"), "--skip", "nope"], "unknown section 'nope'"),
                      ([str(tmp_path / "o"), "--budget", "0"], "--budget must be positive")]:
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
