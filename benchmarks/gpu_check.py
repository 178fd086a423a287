"""One prepared GPU check: correctness tests and every benchmark table of issue 17 in one run of <= 8 minutes.

    bash benchmarks/gpu_check.sh OUT [--dry-run] [--budget SECONDS] [--skip SECTION ...] [--bundle FILE.tar.gz]

Sections, in order: ``environment`` (GPU model, driver, CUDA, cuDNN, torch, Triton), ``pytest_gpu``
(``pytest -m gpu tests``), ``sparse_conv.<backend>`` for dense / dense-masked / gather / triton / auto (single
convs at the planned shapes, 0/50/75/90 % masked, fp32 and bf16; merged into ``sparse_conv``), ``encoder`` (the
planned ResEnc encoder, forward+backward), ``pretrain`` (spark and hyspark iterations/s and peak GiB at the planned
size, sparse vs dense-masked, bf16), ``ssl_benchmark`` (a tiny ``ssl_benchmark -device cuda``). Every section runs
in its own process with a time limit (the budget left is shared out so later sections keep their minimum); a
failing or stopped section writes its error to ``OUT/<section>.error.txt`` and the run goes on. Every table is
``OUT/<name>.json`` + ``OUT/<name>.md``; ``OUT/summary`` lists each section's status; ``OUT/report.md`` joins
them. ``--dry-run``: the same code on CPU with tiny shapes (Triton only through its interpreter when active).

Where only a few files can be carried back from the GPU machine: ``bash benchmarks/gpu_check.sh /tmp/gc --bundle
$OUT/gpu_check.tar.gz; cp /tmp/gc/report.md $OUT/`` (two files: every table and log, and the joined report).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from gpu_check_tables import Table, env_meta  # noqa: E402


@dataclass
class Section:
    name: str
    limit_s: float  # on a GPU
    limit_dry_s: float
    min_s: float = 15.0  # kept back for it while earlier sections run


CONV_LABELS = ("dense", "dense-masked", "gather", "triton", "auto")
SECTIONS = [Section("environment", 30, 60), Section("pytest_gpu", 200, 300, 30),
            *[Section(f"sparse_conv.{b}", 60 if b in ("triton", "auto") else 30, 120) for b in CONV_LABELS],
            Section("encoder", 60, 120), Section("pretrain", 90, 300), Section("ssl_benchmark", 150, 600)]


class Context:
    def __init__(self, out: Path, dry: bool, deadline: float):
        import torch

        self.out, self.dry, self.deadline = out, dry, deadline
        self.device = torch.device("cpu" if dry else "cuda")
        self.warmup, self.repeats = (1, 1) if dry else (2, 5)

    def time_left(self) -> float:
        return self.deadline - time.time()


# --- sections (each runs in its own process: ``gpu_check.py OUT --section NAME``) ---------------------------

def section_environment(ctx: Context) -> None:
    from gpu_check_tables import environment

    env = environment(REPO, ctx.dry)
    if not ctx.dry and not env["cuda_available"]:
        raise RuntimeError("CUDA is not available (run with --dry-run on a machine without a GPU)")
    t = Table(ctx.out, "environment", "Environment", ["key", "value"], {})
    for k, v in env.items():
        t.add(key=k, value=v)
    t.meta = env_meta(ctx.out)
    t.save()


def _pytest_rows(xml_path: Path, log: str) -> list[dict]:
    """Per-test outcome from pytest's junit XML, or from the ``-v`` log when pytest was stopped before writing it."""
    rows = []
    if xml_path.is_file():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome, msg = {"failure": "failed"}.get(tag, tag), (el.get("message") or "")[:300]
            rows.append(dict(test=f"{case.get('classname', '')}::{case.get('name')}", outcome=outcome,
                             seconds=float(case.get("time") or 0), message=msg))
        return rows
    for line in log.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            rows.append(dict(test=parts[0], outcome=parts[1].lower(), seconds=None, message="(from the log)"))
    return rows


def section_pytest_gpu(ctx: Context) -> None:
    xml, logf = ctx.out / "pytest_gpu.xml", ctx.out / "pytest_gpu.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    select = ["-m", "gpu", "tests"]
    if ctx.dry:  # CPU with tiny shapes; the CLI runs take minutes on CPU (test_pretraining/test_finetune cover them)
        env["SSL3D_GPU_TEST_DEVICE"] = "cpu"
        select = ["-m", "gpu", "tests/test_gpu.py", "-k", os.environ.get("GPU_CHECK_DRY_PYTEST_K",
                                                                           "not pretraining and not finetune")]
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}", *select]
    with open(logf, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(ctx.time_left() - 10, 1))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGINT)  # pytest then still writes its summary and the junit file
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    text = logf.read_text()
    t = Table(ctx.out, "pytest_gpu", "pytest -m gpu", ["test", "outcome", "seconds", "message"], env_meta(ctx.out),
              note=f"command: {' '.join(cmd[1:])}; exit code {proc.returncode}; log: pytest_gpu.log")
    rows = _pytest_rows(xml, text)
    for r in rows:
        t.add(**r)
    if not rows:
        t.add(test="(none)", outcome="error", message=text.strip().splitlines()[-1][:300] if text.strip() else "")
    if proc.returncode not in (0, 5) or any(r["outcome"] in ("failed", "error") for r in rows):
        raise RuntimeError(f"pytest -m gpu: exit code {proc.returncode}; see pytest_gpu.log")


def section_sparse_conv(ctx: Context, label: str) -> None:
    from gpu_check_sparse import conv_section

    conv_section(ctx, label)


def section_encoder(ctx: Context) -> None:
    from gpu_check_sparse import encoder_section

    encoder_section(ctx)


def section_pretrain(ctx: Context) -> None:
    """``benchmarks/pretrain_throughput.py`` (its command line), once per method: spark and hyspark, dense-masked
    vs sparse, bf16 (activation checkpointing is left to that script: its rows do not fit the 8 minutes)."""
    import tempfile

    script = HERE / "pretrain_throughput.py"
    text = script.read_text()
    # bf16 on a GPU; the CPU dry run in fp32 (bf16 steps on CPU are ~15x slower than fp32)
    amp = ["--amp", "off" if ctx.dry else "bf16"] if "--amp" in text else []
    if ctx.dry:
        shape = ["--patch", "16", "32", "32", "--spacing", "2", "1", "1", "--size", "tiny", "--warmup", "1",
                 "--steps", "1", "--device", "cpu", "--threads", "1"]
    else:
        shape = ["--patch", "128", "128", "128", "--spacing", "1.5", "1.5", "1.5", "--size", "", "--warmup", "2",
                 "--steps", "5", "--device", "cuda", "--threads", "4"]
    cols = ["method", "backend", "checkpointed", "amp", "mask_ratio", "it_per_s", "median_s", "peak_gib",
            "params_m", "patch", "vs_dense_masked", "note"]
    t = Table(ctx.out, "pretrain", "Pretraining step (batch 2, planned network and patch)", cols, env_meta(ctx.out),
              note="dense-masked = reference backend (dense conv on the masked input, what SparK/nnssl run); sparse "
                   "= auto; peak_gib = torch.cuda.max_memory_allocated (CPU dry run: RSS growth); "
                   "vs_dense_masked = iterations/s over dense-masked's")
    methods = ("spark",) if ctx.dry else ("spark", "hyspark")  # dry run: one method (4 workers take minutes)
    missing = []
    for method in methods:  # one call per method, so a stopped or failed one keeps the other's rows
        with tempfile.TemporaryDirectory() as tmp:  # its workers are separate processes already
            js = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(script), "--methods", method, "--batch", "2", *shape, *amp, "--json", str(js)]
            print("$ " + " ".join(cmd), flush=True)
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                   timeout=max(ctx.time_left() - 3, 1))
                print(r.stdout + r.stderr, flush=True)
                rows = json.loads(js.read_text())["rows"] if js.is_file() else []
                note = r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else f"exit {r.returncode}"
            except subprocess.TimeoutExpired as e:
                print(e.stdout or "", e.stderr or "", flush=True)
                rows, note = [], "stopped: section time limit reached"
        for res in rows:
            t.add(method=res["method"], backend="dense-masked" if res["backend"] == "reference" else "sparse",
                  checkpointed=bool(res.get("checkpoint_activations")), amp=res.get("amp", "off"),
                  mask_ratio=res["mask_ratio"], it_per_s=res["it_per_s"], median_s=res["median_s"],
                  peak_gib=res["peak_mem_mb"] / 1024, params_m=res["params_m"],
                  patch="x".join(map(str, res["patch"])), vs_dense_masked=res.get("speedup_vs_dense_masked"))
        lost = [f"{method}/{b}" for b in ("reference", "auto") if not any(q["backend"] == b for q in rows)]
        if lost:
            t.add(method=", ".join(lost), note=f"error: no result: {note}")
            missing += lost
    if missing:
        raise RuntimeError(f"pretrain: no result for {', '.join(missing)}; see pretrain.log")


def section_ssl_benchmark(ctx: Context) -> None:
    """Demo data -> plan -> ``ssl_benchmark`` with one tiny SparK arm on the GPU (CPU in the dry run)."""
    import shutil

    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp")) / f"gpu_check_bench_{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
               nnUNet_results=str(work / "res"), nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    for k in ("raw", "pre", "res"):
        (work / k).mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    cols = ["step", "id", "status", "mean_dice", "seconds", "note"]
    t = Table(ctx.out, "ssl_benchmark", "Tiny ssl_benchmark (spark, 1 labeled case, 1 seed)", cols, env_meta(ctx.out))
    steps = [("demo data", ["ssl_make_demo_data", "-o", str(work / "raw"), "--size", "tiny", "-nu", "3", "-nl", "4",
                            "--no-progress"]),
             ("plan", ["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32",
                       "32"]),
             ("ssl_benchmark", ["ssl_benchmark", "-u", "801", "-l", "802", "-m", "spark", "--n-train", "1", "--seeds",
                                "1", "--pretrain-epochs", "1", "--pretrain-iters", "2", "--ft-epochs", "1",
                                "--ft-iters", "2", "--size", "tiny", "-device", ctx.device.type, "-np", "1",
                                "--no-progress", "-o", str(work / "out")])]
    try:
        for step, cmd in steps:
            t0 = time.time()
            with open(ctx.out / "ssl_benchmark.log", "a") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                try:
                    rc = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=max(ctx.time_left() - 3, 1)).returncode
                except subprocess.TimeoutExpired:
                    rc = "stopped: section time limit reached"
            t.add(step=step, status="ok" if rc == 0 else str(rc), seconds=time.time() - t0)
            if rc != 0:
                raise RuntimeError(f"{cmd[0]}: {rc}; see ssl_benchmark.log")
        for row in benchmark_rows(json.loads((work / "out" / "results.json").read_text())):
            t.add(**row)
        shutil.copy(work / "out" / "results.md", ctx.out / "ssl_benchmark_results.md")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def benchmark_rows(res: dict) -> list[dict]:
    """Table rows from ``ssl_benchmark``'s results.json: pretraining runs, arms, failures."""
    rows = [dict(step="pretraining", id=name, status="ok", seconds=p.get("wall_s"),
                 note=f"train loss {p.get('final_train_loss')}, val loss {p.get('final_val_loss')}")
            for name, p in res.get("pretraining", {}).items()]
    rows += [dict(step="arm", id=arm["id"], status=arm.get("status"), mean_dice=arm.get("mean_dice"),
                  seconds=(arm.get("finetune_s") or 0) + (arm.get("predict_s") or 0)) for arm in res.get("arms", [])]
    rows += [dict(step="failure", id=str(f.get("step")), status="failed", note=str(f.get("error"))[:300])
             for f in res.get("failures", [])]
    return rows


def run_section(name: str, ctx: Context) -> None:
    if name.startswith("sparse_conv."):
        return section_sparse_conv(ctx, name.split(".", 1)[1])
    return globals()["section_" + name](ctx)


# --- the driver ---------------------------------------------------------------------------------------------

REPORT_ORDER = ["summary", "environment", "pytest_gpu", "sparse_conv", "encoder", "pretrain", "ssl_benchmark"]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _run_child(sec: Section, out: Path, dry: bool, limit: float) -> tuple[str, str]:
    """Run one section in its own process group; SIGINT at its limit (pytest still reports), then SIGKILL."""
    log = out / f"{sec.name}.log" if sec.name != "pytest_gpu" else out / "pytest_gpu.driver.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--section", sec.name,
           "--deadline", f"{time.time() + limit - 5:.1f}", *(["--dry-run"] if dry else [])]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = "timeout"
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    if status != "ok":
        (out / f"{sec.name}.error.txt").write_text(f"{status} after a limit of {limit:.0f} s\n$ {' '.join(cmd)}\n"
                                                   f"{_tail(log)}\n")
        lines = [ln for ln in _tail(log, 20).splitlines() if ln.strip()]
        return status, (lines[-1][:200] if lines else "")
    return status, ""


def _bundle(out: Path, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(tmp, path)


def drive(out: Path, dry: bool, budget: float, plan: list[Section], bundle: Path | None) -> int:
    from gpu_check_sparse import merge_conv_tables

    start = time.time()
    # auto's first-use decisions (timings per layer signature) shared by every section and kept as a result
    cache = out / "sparse_dispatch_cache.json"
    cache.unlink(missing_ok=True)
    os.environ["SSL3D_SPARSE_CACHE"] = str(cache)
    summary = Table(out, "summary", "gpu_check sections", ["section", "status", "seconds", "limit_s", "note"],
                    note=f"{'dry run (CPU, tiny shapes)' if dry else 'GPU run'}; budget {budget:.0f} s")
    failed = 0
    previous = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for i, sec in enumerate(plan):
            left = budget - (time.time() - start)
            limit = min(sec.limit_dry_s if dry else sec.limit_s, left - sum(s.min_s for s in plan[i + 1:]))
            if limit < 5:
                summary.add(section=sec.name, status="skipped", limit_s=round(limit), note="no time left in the budget")
                failed += 1
                continue
            t0 = time.time()
            print(f"[gpu_check] {sec.name} (limit {limit:.0f} s)", flush=True)
            status, note = _run_child(sec, out, dry, limit)
            failed += status != "ok"
            summary.add(section=sec.name, status=status, seconds=round(time.time() - t0, 1), limit_s=round(limit),
                        note=note)
            print(f"[gpu_check] {sec.name}: {status} in {time.time() - t0:.0f} s {note}", flush=True)
    except KeyboardInterrupt:
        summary.add(section="(driver)", status="interrupted", seconds=round(time.time() - start, 1))
        failed += 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if any(s.name.startswith("sparse_conv.") for s in plan):
            merge_conv_tables(out)
        summary.meta = env_meta(out)
        summary.save()
        parts = [(out / f"{n}.md").read_text() for n in REPORT_ORDER if (out / f"{n}.md").is_file()]
        (out / "report.md").write_text("# gpu_check report\n\n" + "\n".join(parts))
        if bundle is not None:
            _bundle(out, bundle)
    print(f"[gpu_check] done in {time.time() - start:.0f} s; {failed} section(s) not ok; report: {out / 'report.md'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in SECTIONS]
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (created; existing tables in it are overwritten)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (what the test suite runs)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds for all sections (default 470 on a GPU, 900 for the dry run)")
    ap.add_argument("--only", nargs="+", default=None, metavar="SECTION", help=f"run only these: {', '.join(names)}")
    ap.add_argument("--skip", nargs="+", default=[], metavar="SECTION", help="leave these out")
    ap.add_argument("--bundle", default=None, help="also write OUT as one .tar.gz here (few files to carry back)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    bad = [n for n in [*(args.only or []), *args.skip, *([args.section] if args.section else [])] if n not in names]
    problem = (f"unknown section {bad[0]!r} (sections: {', '.join(names)})" if bad else
               f"{out}: exists and is not a folder" if out.exists() and not out.is_dir() else
               "--budget must be positive" if args.budget is not None and args.budget <= 0 else
               f"{args.bundle}: its folder does not exist"
               if args.bundle and not Path(args.bundle).resolve().parent.is_dir() else None)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        ctx = Context(out, args.dry_run, args.deadline or time.time() + 3600)
        run_section(args.section, ctx)
        return 0
    plan = [s for s in SECTIONS if (args.only is None or s.name in args.only) and s.name not in args.skip]
    budget = args.budget or (900.0 if args.dry_run else 470.0)
    return drive(out.resolve(), args.dry_run, budget, plan, Path(args.bundle).resolve() if args.bundle else None)


if __name__ == "__main__":
    sys.exit(main())
