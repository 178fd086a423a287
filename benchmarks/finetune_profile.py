"""Where the time of one small-preset fine-tuning iteration goes on CPU, with nnU-Net's defaults ("stock") and with
``ssl_finetune --lean`` ("lean": ``finetune_schedule.CPU_SPEED_OPTIONS``), side by side in one run.

Each run is stock ``SSLFinetuneTrainer.run_training`` in a fresh process (scratch ResEnc of the small preset, its
optimizer, LR, batch and iterations per epoch, on the demo's labeled data), with timers wrapped around nnU-Net's hooks:
waiting for the augmentation workers' batch, forward + loss, backward + clip + step, the per-epoch validation
iterations, checkpoint writes, progress.png, log lines, the rest of nnU-Net's epoch start/end, and the one-time
start-up (data loaders and their workers, first batches) and end (final checkpoint, worker shutdown), which the
table spreads over the profiled iterations. The augmentation workers' own CPU time (they run next to the main process)
is reported separately. The two variants run interleaved (stock, lean, stock, lean, ...) and each row is the median
over rounds, so load from other processes on a shared machine falls on both alike; the load average is printed.

    .venv/bin/python benchmarks/finetune_profile.py --work /tmp/ftprof [--epochs 5] [--rounds 3] [--json out.json]

The first call writes demo data (as ``make demo`` does: 10 labeled portal-venous cases, 5 x 3.5 x 3.5 mm) and a
1-iteration tiny pretraining (only its plans are used) under ``--work``; later calls reuse them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

BIN = Path(sys.executable).parent
LABELED = "Dataset802_SynthCTOrgans"
PLANS = "ssl3d_sparkPlans_scratch"
VARIANTS = ("stock", "lean")
# (key, label): the rows of the table, in order; "once" rows are one-time costs spread over the profiled iterations
ROWS = [("data_wait", "data: wait for the augmentation worker's batch"), ("forward", "forward + loss"),
        ("backward", "backward + grad clip + optimizer step"), ("validation", "on-epoch-end validation iterations"),
        ("checkpoint", "checkpoint writes (best/latest/intermediate)"), ("plot", "progress.png plotting"),
        ("log", "log lines (print_to_log_file)"), ("epoch_other", "rest of nnU-Net's epoch start/end (LR step, "
                                                                 "logger, EMA)"),
        ("startup", "once: start-up (network, loaders, workers, first batches)"),
        ("train_end", "once: end (final checkpoint, worker shutdown)"),
        ("unaccounted", "unaccounted (trainer construction, Python between hooks)")]


def sh(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"finetune_profile: {' '.join(cmd[:2])} failed:\n{r.stderr[-2000:]}")


def nnunet_env(work: Path, results: Path) -> dict:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                nnUNet_results=str(results), nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "1"),
                nnUNet_compile="false")


def prepare(work: Path) -> None:
    """Demo data, pool plans, a 1-iteration tiny pretraining and the scratch fine-tuning plans (idempotent)."""
    from ssl3d.evaluation.protocol import PRESETS

    if (work / "pre" / LABELED / f"{PLANS}.json").is_file():
        return
    env = nnunet_env(work, work / "res")
    for k in ("raw", "pre", "res"):
        (work / k).mkdir(parents=True, exist_ok=True)
    b = str(BIN)
    sh([f"{b}/ssl_make_demo_data", "-o", str(work / "raw"), "--seed", "0", "-nu", "16", "-nl", "10", "--size", "small",
        "--phase", "portal-venous", "--no-progress"], env)
    sh([f"{b}/ssl_plan_and_preprocess", "-d", "801", "-np", "2", "--spacing", "5", "3.5", "3.5", "--no-progress"], env)
    sh([f"{b}/ssl_pretrain", "-d", "801", "-m", "spark", "-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters",
        "1", "--val-iters", "1", "--no-progress"], env)
    s = PRESETS["small"]
    results = work / "res" / "Dataset801_SynthCTPool" / "SparKPretrainer__ssl3dPlans__3d_fullres"
    sh([f"{b}/ssl_finetune", "-d", "802", "-p", str(results), "-device", "cpu", "--scratch", "--prepare-only",
        "--no-lean", "--epochs", str(s["ft_epochs"]), "--iters", str(s["ft_iters"]), "--val-iters",
        str(s["ft_val_iters"]), "--batch-size", str(s["ft_batch"]), "--lr", str(s["ft_lr"]), "--optimizer",
        s["optimizer"], "--warmup", s["warmup"], "--seed", "0", "--no-final-val", "-np", "2"], env)


# ---- one run (child process) ---------------------------------------------------------------------------------------
def _children_cpu_s() -> tuple[int, float]:
    """Number of child processes of this one and their user + system CPU seconds (from /proc)."""
    me, tick, n, cpu = os.getpid(), os.sysconf("SC_CLK_TCK"), 0, 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            n, cpu = n + 1, cpu + (int(fields[11]) + int(fields[12])) / tick
    return n, cpu


class Timers:
    """Exclusive times: a timed call's seconds minus those of the timed calls nested in it, so the rows add up to
    the wall time. ``phase`` ("start", "run", "end") names where a nested call happened (log lines and checkpoint
    writes of start-up and end belong to those one-time rows)."""

    def __init__(self):
        self.t: dict = defaultdict(float)
        self.stack: list[list[float]] = []
        self.phase = "start"

    def call(self, key: str, fn, *a, **k):
        self.stack.append([time.perf_counter(), 0.0])
        try:
            return fn(*a, **k)
        finally:
            t0, nested = self.stack.pop()
            dt = time.perf_counter() - t0
            self.t[key] += dt - nested
            if self.stack:
                self.stack[-1][1] += dt

    def wrap(self, obj, name: str, key=None) -> None:
        f = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: self.call(key() if callable(key) else key or name, f, *a, **k))


class _TimedLoader:
    """``next()`` of nnU-Net's augmenter, timed (what the main process waits for a batch)."""

    def __init__(self, inner, timers: Timers, key: str):
        self.inner, self.timers, self.key = inner, timers, key

    def __next__(self):
        return self.timers.call(self.key, next, self.inner)


def run_child(variant: str, work: Path, epochs: int) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from ssl3d.training.finetune_schedule import CPU_SPEED_OPTIONS
    from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer

    pre = work / "pre" / LABELED
    plans = load_json(str(pre / f"{PLANS}.json"))
    ft = plans["configurations"]["3d_fullres"]["ssl3d_finetune"]
    for k in (*CPU_SPEED_OPTIONS, "checkpoints_at", "save_every"):  # nnU-Net's defaults unless "lean"
        ft.pop(k, None)
    ft.update(num_epochs=epochs, **(CPU_SPEED_OPTIONS if variant == "lean" else {}))
    tm = Timers()
    t0 = time.perf_counter()
    trainer = SSLFinetuneTrainer(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), torch.device("cpu"))
    tm.call("initialize", trainer.initialize)  # here, so that network, loss and logger can be wrapped
    net = trainer.network
    tm.wrap(net, "forward", lambda: "forward_" + ("train" if net.training else "val"))
    loss = trainer.loss
    trainer.loss = lambda *a, **k: tm.call("loss_" + ("train" if net.training else "val"), loss, *a, **k)
    tm.wrap(trainer.logger, "plot_progress_png", "plot")
    tm.wrap(trainer, "save_checkpoint", lambda: f"checkpoint_{tm.phase}")
    tm.wrap(trainer, "print_to_log_file", lambda: f"log_{tm.phase}")
    for name in ("on_epoch_start", "on_train_epoch_start", "train_step", "on_train_epoch_end",
                 "on_validation_epoch_start", "validation_step", "on_validation_epoch_end", "on_epoch_end"):
        tm.wrap(trainer, name)
    get_loaders, start, end = trainer.get_dataloaders, trainer.on_train_start, trainer.on_train_end
    trainer.get_dataloaders = lambda: tuple(_TimedLoader(g, tm, k) for g, k in zip(get_loaders(), ("next_train",
                                                                                                  "next_val")))
    workers: dict = {}

    def timed_start():
        tm.call("on_train_start", start)
        tm.phase = "run"

    def unwrap_then_end():  # nnU-Net shuts its augmenters down only when it recognises their class
        workers["n"], workers["cpu_s"] = _children_cpu_s()
        tm.phase = "end"
        trainer.dataloader_train, trainer.dataloader_val = trainer.dataloader_train.inner, trainer.dataloader_val.inner
        tm.call("on_train_end", end)
    trainer.on_train_start, trainer.on_train_end = timed_start, unwrap_then_end
    trainer.run_training()
    tm.t["total"] = time.perf_counter() - t0
    return {"variant": variant, "times": dict(tm.t), "iters": epochs * trainer.num_iterations_per_epoch,
            "epochs": epochs, "torch_threads": torch.get_num_threads(), "workers": workers.get("n", 0),
            "worker_cpu_s": workers.get("cpu_s", 0.0), "n_proc_DA": os.environ.get("nnUNet_n_proc_DA")}


def breakdown(r: dict) -> dict:
    """Seconds per row of ROWS (and "total") from one run's exclusive timers."""
    t = defaultdict(float, r["times"])
    rows = {"data_wait": t["next_train"], "forward": t["forward_train"] + t["loss_train"],
            "backward": t["train_step"],
            "validation": sum(t[k] for k in ("on_validation_epoch_start", "next_val", "validation_step",
                                             "forward_val", "loss_val", "on_validation_epoch_end")),
            "checkpoint": t["checkpoint_run"], "plot": t["plot"], "log": t["log_run"],
            "epoch_other": t["on_epoch_start"] + t["on_train_epoch_start"] + t["on_train_epoch_end"]
            + t["on_epoch_end"],
            "startup": t["initialize"] + t["on_train_start"] + t["log_start"] + t["checkpoint_start"],
            "train_end": t["on_train_end"] + t["log_end"] + t["checkpoint_end"]}
    rows["unaccounted"] = t["total"] - sum(rows.values())
    rows["total"] = t["total"]
    return rows


# ---- parent: interleaved runs, table -----------------------------------------------------------------------------
def run_variant(variant: str, work: Path, epochs: int, rnd: int) -> dict:
    out = work / f"profile_{variant}_{rnd}.json"
    results = work / f"results_{variant}_{rnd}"
    env = dict(nnunet_env(work, results), PYTHONWARNINGS="ignore")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as a plain shell runs ssl_benchmark: torch picks its threads
        env.pop(k, None)
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--epochs", str(epochs), "--json",
           str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        sys.exit(f"finetune_profile: {variant} run failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def table(runs: dict[str, list[dict]]) -> str:
    med = {v: {k: statistics.median(breakdown(r)[k] for r in rs) for k in [*(k for k, _ in ROWS), "total"]}
           for v, rs in runs.items()}
    iters = runs["stock"][0]["iters"]
    ms = {v: {k: 1000 * x / iters for k, x in m.items()} for v, m in med.items()}
    lines = [f"| per iteration ({iters} iterations = {runs['stock'][0]['epochs']} epochs, median of "
             f"{len(runs['stock'])} runs each) | stock ms/iter | share | lean ms/iter | share | stock / lean |",
             "|---|---|---|---|---|---|"]
    for key, label in ROWS + [("total", "**total (wall)**")]:
        s, lean = ms["stock"][key], ms["lean"][key]
        ratio = f"{s / lean:.2f}×" if lean > 0.05 else "–"
        lines.append(f"| {label} | {s:.0f} | {100 * s / ms['stock']['total']:.0f} % | {lean:.0f} | "
                     f"{100 * lean / ms['lean']['total']:.0f} % | {ratio} |")
    steady = {v: ms[v]["total"] - ms[v]["startup"] - ms[v]["train_end"] for v in ms}
    lines.append(f"| total without the one-time rows | {steady['stock']:.0f} | | {steady['lean']:.0f} | | "
                 f"{steady['stock'] / steady['lean']:.2f}× |")
    info = {v: (rs[0]["torch_threads"], rs[0]["workers"], rs[0]["n_proc_DA"],
                statistics.median(1000 * r["worker_cpu_s"] / r["iters"] for r in rs)) for v, rs in runs.items()}
    lines += ["", "| | stock | lean |", "|---|---|---|",
              "| torch intra-op threads | " + " | ".join(str(info[v][0]) for v in VARIANTS) + " |",
              "| augmentation worker processes (nnUNet_n_proc_DA) | " +
              " | ".join(f"{info[v][1]} ({info[v][2]} train + val)" for v in VARIANTS) + " |",
              "| worker CPU ms/iter (in parallel with the main process) | " +
              " | ".join(f"{info[v][3]:.0f}" for v in VARIANTS) + " |"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="work folder (demo data, runs)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per run (10 iterations each, default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="stock/lean pairs, interleaved (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="write every run's raw timers here")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = a.work.resolve()
    if a.child:
        res = run_child(a.child, work, a.epochs)
        a.json.write_text(json.dumps(res))
        return 0
    if a.epochs < 1 or a.rounds < 1:
        sys.exit("finetune_profile: --epochs and --rounds must be >= 1")
    prepare(work)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = [os.getloadavg()[0]]
    for rnd in range(a.rounds):
        for v in VARIANTS:
            runs[v].append(run_variant(v, work, a.epochs, rnd))
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{a.rounds} {v}: {runs[v][-1]['times']['total']:.1f} s", file=sys.stderr)
    print(table(runs))
    print(f"\n1-min load average during the runs: {min(loads):.1f}-{max(loads):.1f} (median "
          f"{statistics.median(loads):.1f}) on {os.cpu_count()} cores")
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "load": loads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
