"""Memory over time: a tiny pretraining and a tiny fine-tuning for a few hundred iterations with nnU-Net's
data-loader workers, the resident memory (RSS) of every process of each run's tree sampled once a second.

Host memory that grows until the process is killed is a reported failure of SparK's public code; here the growth
of the tree's summed PSS after warm-up must stay under ``--limit-mb`` (50 MB). Warm-up = the first
``--warmup`` fraction of a run's samples (imports, dataset caches, first batches, allocator pools); growth =
median of the last 10 % of the training samples minus median of the 10 % right after warm-up (medians: a batch in
flight does not decide it; the run's final 10 % — final checkpoint, reconstruction-quality pass — are left out).
RSS counts pages shared between forked workers once per process that touched them (copy-on-write pages of the
trainer grow in every worker), so it is reported but PSS is judged. Synthetic data (``ssl_make_demo_data --size
tiny``) in a temporary folder; nothing else is touched.

    .venv/bin/python benchmarks/soak.py [--iters 300] [--workers 2] [--keep DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in kB from /proc. PSS splits pages shared between forked workers among them, so it sums to the
    memory the tree really uses; RSS counts a shared page once per process that touched it."""
    try:
        rss = pss = None
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
        return (rss, pss) if rss is not None and pss is not None else None
    except (OSError, ValueError):
        return None


def _tree(root: int) -> list[int]:
    """``root`` and every live descendant (from /proc; psutil is optional)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                raw = (p / "stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def run_sampled(cmd: list[str], env: dict, log: Path, period_s: float = 1.0) -> dict:
    """Run ``cmd``, sampling the summed RSS of its process tree every ``period_s``."""
    samples: list[tuple[float, int, int, int]] = []  # (seconds, RSS kB, PSS kB, processes)
    with open(log, "w") as out:
        # own process group: a stopped soak ends the run with it (SIGTERM handler in main)
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0, done = time.time(), threading.Event()

        def sample() -> None:
            while not done.is_set():
                mem = [m for m in map(_memory_kb, _tree(proc.pid)) if m]
                if mem:
                    samples.append((time.time() - t0, sum(m[0] for m in mem), sum(m[1] for m in mem), len(mem)))
                done.wait(period_s)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            rc = proc.wait()
        finally:
            done.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
        th.join()
    return {"rc": rc, "wall_s": time.time() - t0, "samples": samples}


def growth(samples: list[tuple[float, int, int, int]], warmup: float) -> dict:
    """Growth between the window right after warm-up and the last window before the tree shrinks at shutdown."""
    steady = max(s[3] for s in samples)
    last = max(i for i, s in enumerate(samples) if s[3] == steady)  # the end: before workers exit
    # the last 10 % are the run's end (final checkpoint, reconstruction-quality pass, final validation), not steps
    n = max(2, int((last + 1) * 0.9))
    start = int(n * warmup)
    window = max(1, n // 10)
    out = {"samples": len(samples), "max_processes": steady}
    for key, col in (("rss", 1), ("pss", 2)):
        v = [s[col] / 1024 for s in samples[:n]]
        after, end = statistics.median(v[start:start + window]), statistics.median(v[-window:])
        out |= {f"{key}_after_warmup_mb": after, f"{key}_end_mb": end, f"{key}_growth_mb": end - after,
                f"{key}_peak_mb": max(v)}
    return out


def sh(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300, help="training iterations per run (epochs x 20)")
    ap.add_argument("--workers", type=int, default=2, help="nnUNet_n_proc_DA: data-loader worker processes")
    ap.add_argument("--warmup", type=float, default=0.25, help="share of samples counted as warm-up")
    ap.add_argument("--limit-mb", type=float, default=50.0)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in run_sampled
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="ssl3d_soak_"))
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
               nnUNet_results=str(work / "res"), nnUNet_n_proc_DA=str(a.workers), nnUNet_compile="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for k in ("raw", "pre", "res"):
        (work / k).mkdir(parents=True, exist_ok=True)
    sh([str(BIN / "ssl_make_demo_data"), "-o", str(work / "raw"), "--size", "tiny", "-nu", "6", "-nl", "4",
        "--no-progress"], env)
    sh([str(BIN / "ssl_plan_and_preprocess"), "-d", "801", "-np", "2", "--no-progress", "--patch-size", "16", "32",
        "32"], env)
    per_epoch = 20
    epochs = max(2, a.iters // per_epoch)
    runs = {
        "pretrain (spark, tiny)": [str(BIN / "ssl_pretrain"), "-d", "801", "-m", "spark", "-device", "cpu", "--size",
                                   "tiny", "--epochs", str(epochs), "--iters", str(per_epoch), "--val-iters", "2",
                                   "--batch-size", "2", "--no-progress", "--preview-every", "0",
                                   "--overwrite"],
    }
    results = work / "res" / "Dataset801_SynthCTPool" / "SparKPretrainer__ssl3dPlans__3d_fullres"
    runs["finetune (nnU-Net, tiny)"] = [str(BIN / "ssl_finetune"), "-d", "802", "-p", str(results), "-device", "cpu",
                                        "--epochs", str(epochs), "--iters", str(per_epoch), "--val-iters", "2",
                                        "--no-val", "-np", "1", "--overwrite"]
    rows = []
    for name, cmd in runs.items():
        res = run_sampled(cmd, env, work / f"{name.split()[0]}.log")
        if res["rc"] != 0:
            sys.exit(f"{name} failed (exit {res['rc']}); see {work / (name.split()[0] + '.log')}")
        rows.append({"run": name, "iterations": epochs * per_epoch, "wall_s": res["wall_s"],
                     **growth(res["samples"], a.warmup), "trace": res["samples"]})
        if a.json:  # after every run: a long soak that is stopped still leaves its finished runs
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"| run | iterations | wall s | processes | PSS after warm-up MB | PSS at end MB | PSS growth MB | "
          f"RSS growth MB | peak PSS / RSS MB | < {a.limit_mb:g} MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['iterations']} | {r['wall_s']:.0f} | {r['max_processes']} | "
              f"{r['pss_after_warmup_mb']:.0f} | {r['pss_end_mb']:.0f} | {r['pss_growth_mb']:+.1f} | "
              f"{r['rss_growth_mb']:+.1f} | {r['pss_peak_mb']:.0f} / {r['rss_peak_mb']:.0f} | "
              f"{'yes' if r['pss_growth_mb'] < a.limit_mb else 'NO'} |")
    return 0 if all(r["pss_growth_mb"] < a.limit_mb for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
