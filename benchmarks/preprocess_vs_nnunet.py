"""ssl3d fingerprint+plan+preprocess vs ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` on the same data.

Both run as subprocesses on the same synthetic CT pool with the same process count, one after the other.
nnU-Net needs labels to fingerprint (it samples intensities under them and crashes on all-zero labels), so
it gets dummy labels: a body mask (> -500 HU), which also makes its intensity statistics comparable.
Peak memory is the highest sum of RSS over the whole process tree, sampled every 50 ms.

    .venv/bin/python benchmarks/preprocess_vs_nnunet.py --cases 16 --np 2 [--size small] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

BIN = Path(sys.executable).parent


def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS over root_pid and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid, ppid = int(entry), int(fields["PPid"].strip())
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root_pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, int]:
    """(wall seconds, peak tree RSS bytes, return code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-3000:])
    return wall, peak, proc.returncode


def add_body_labels(dataset: Path) -> None:
    """Dummy labels for nnU-Net: 1 inside the body (> -500 HU), 0 elsewhere."""
    (dataset / "labelsTr").mkdir(exist_ok=True)
    for img_file in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        img = sitk.ReadImage(str(img_file))
        lab = sitk.Cast(sitk.BinaryThreshold(sitk.Cast(img, sitk.sitkFloat32), -500.0, 1e9, 1, 0), sitk.sitkUInt8)
        sitk.WriteImage(lab, str(dataset / "labelsTr" / img_file.name.replace("_0000.nii.gz", ".nii.gz")))
    dj = json.loads((dataset / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "body": 1}
    (dataset / "dataset.json").write_text(json.dumps(dj, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep data here instead of a temporary folder")
    ap.add_argument("--json", default="benchmarks/results/preprocess_vs_nnunet.json")
    args = ap.parse_args()

    from ssl3d.data.synthetic import write_demo_datasets

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssl3d_bench_"))
    raw = work / "raw"
    write_demo_datasets(raw, seed=args.seed, n_unlabeled=args.cases, n_labeled=0, size=args.size)
    dataset = next(raw.glob("Dataset801_*"))
    add_body_labels(dataset)
    n_vox = sum(np.prod(sitk.ReadImage(str(f)).GetSize()) for f in (dataset / "imagesTr").glob("*.nii.gz"))

    rows = []
    for name, cmd, pre in [
        ("ssl3d", [str(BIN / "ssl_plan_and_preprocess"), "-d", "801", "-np", str(args.np), "--no-progress"],
         work / "pre_ssl3d"),
        ("nnU-Net", [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "801", "-c", "3d_fullres", "-np", str(args.np),
                     "-npfp", str(args.np)], work / "pre_nnunet"),
    ]:
        shutil.rmtree(pre, ignore_errors=True)
        pre.mkdir(parents=True)
        env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
                   nnUNet_results=str(work / "results"), OMP_NUM_THREADS="1")
        wall, peak, rc = run_measured(cmd, env)
        rows.append({"tool": name, "seconds": wall, "cases_per_s": args.cases / wall, "peak_rss_mb": peak / 2 ** 20,
                     "returncode": rc})

    ours, ref = rows
    result = {"cases": args.cases, "processes": args.np, "size": args.size, "megavoxels": float(n_vox) / 1e6,
              "rows": rows, "throughput_ratio": ours["cases_per_s"] / ref["cases_per_s"],
              "peak_rss_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"], "cpu_count": os.cpu_count()}
    print(f"{args.cases} cases ({result['megavoxels']:.1f} Mvox), -np {args.np}, {os.cpu_count()} CPUs")
    print(f"{'tool':<10}{'seconds':>10}{'cases/s':>10}{'peak RSS MB':>14}{'rc':>4}")
    for r in rows:
        print(f"{r['tool']:<10}{r['seconds']:>10.1f}{r['cases_per_s']:>10.3f}{r['peak_rss_mb']:>14.0f}"
              f"{r['returncode']:>4}")
    print(f"throughput ssl3d/nnU-Net: {result['throughput_ratio']:.2f}x   "
          f"peak RSS ssl3d/nnU-Net: {result['peak_rss_ratio']:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
