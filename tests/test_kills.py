"""Kills leave no orphans and no half-finished pool is trained on: the process guard ends a command's whole group
when its starter dies (also by SIGKILL), owner locks refuse a second run while any process of the first lives,
``kill -9`` of preprocessing / pretraining / ssl_benchmark after the first case / checkpoint resumes to a checked
result with nothing of the killed run left alive."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ct_volume, subprocess_env, write_image
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


# ---- /proc helpers (psutil is not a dependency) ---------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 'state' on


def alive(pid: int, start: str | None = None) -> bool:
    """Running (not a zombie), and the same process if its start time is given (pids are reused)."""
    f = _stat(pid)
    return f is not None and f[0] != "Z" and (start is None or f[19] == start)


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its start time."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (f := _stat(int(p.name))) is not None:
            children.setdefault(int(f[1]), []).append(int(p.name))
    out, todo = {}, list(children.get(pid, []))
    while todo:
        c = todo.pop()
        if (f := _stat(c)) is not None and f[0] != "Z":
            out[c] = f[19]
            todo += children.get(c, [])
    return out


def wait_until(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_all_gone(procs: dict[int, str], timeout: float = 15) -> None:
    wait_until(lambda: not [p for p, s in procs.items() if alive(p, s)], timeout, "the killed run's processes to end")


# ---- the guard and the owner lock ------------------------------------------------------------------------------
PARENT = textwrap.dedent("""
    import os, sys
    from ssl3d.inference.process_guard import run_guarded
    child = ("import subprocess, time; subprocess.Popen(['sleep', '60']); open(sys.argv[1], 'w').write('up'); "
             "time.sleep(60)")
    sys.exit(run_guarded([sys.executable, "-c", "import sys\\n" + child, sys.argv[1]], dict(os.environ)))
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_guard_ends_the_whole_group_with_its_starter(tmp_path, sig):
    flag = tmp_path / "up"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(flag)], stderr=subprocess.PIPE, text=True)
    wait_until(flag.exists, 30, "the guarded command to start")
    tree = descendants(parent.pid)
    assert len(tree) == 3  # guard, python child, sleep grandchild
    parent.send_signal(sig)
    rc = parent.wait(timeout=30)
    assert rc == (-9 if sig == signal.SIGKILL else 130 if sig == signal.SIGINT else 143) or rc != 0
    assert_all_gone(tree)


def test_owner_lock_is_held_while_any_process_of_the_run_lives(tmp_path):
    from ssl3d.inference.process_guard import owner_lock

    lock = tmp_path / ".owner.lock"
    with owner_lock(lock, tmp_path) as fd:
        # an orphan-to-be: inherits the lock descriptor, outlives the with-block (as a survivor of a kill would)
        orphan = subprocess.Popen(["sleep", "60"], pass_fds=[fd])
        with pytest.raises(BadInputError, match="in use by another run"):
            with owner_lock(lock, tmp_path):
                pass
    with pytest.raises(BadInputError, match=f"pid {os.getpid()}"):
        with owner_lock(lock, tmp_path):
            pass
    orphan.kill()
    orphan.wait()
    with owner_lock(lock, tmp_path):  # free once the last holder is gone
        pass


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_preprocessing_kill_then_incomplete_pool_refused_and_rerun_completes(tmp_path, capsys, monkeypatch):
    from ssl3d.cli.pretrain import main as pretrain_main
    from ssl3d.preprocessing.pipeline import PlanOptions, check_pool_complete, plan_and_preprocess
    from ssl3d.preprocessing.preprocessor import verify_outputs

    scans = tmp_path / "scans"
    n_cases = 12  # one process, many cases: the kill after the first case lands mid-run however fast a case is
    for i in range(n_cases):
        write_image(scans / f"s{i}.nii.gz", ct_volume(i, (20, 48, 44)))
    pre = tmp_path / "pre"
    args = [str(BIN / "ssl_plan_and_preprocess"), "-i", str(scans), "-o", str(pre), "-np", "1", "--spacing", "2",
            "0.8", "0.8", "--no-progress"]
    proc = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pool = pre / "Dataset900_SSLPool"
    data = pool / "ssl3dPlans_3d_fullres"
    wait_until(lambda: any(data.glob("*.pkl")), 120, "the first preprocessed case")
    tree = descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert_all_gone(tree)
    assert len(list(data.glob("*.pkl"))) < n_cases, "the kill should land mid-run"

    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    rc = pretrain_main(["-d", pool.name, "-m", "spark", "-device", "cpu", "--size", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "incomplete pool" in err and "rerun ssl_plan_and_preprocess" in err
    assert not (tmp_path / "res").exists()

    opts = PlanOptions(folders=[str(scans)], output_root=str(pre), num_processes=1, progress=False,
                       spacing=(2, 0.8, 0.8))
    res = plan_and_preprocess(opts)
    assert sorted(res.case_ids) == sorted(f"s{i}" for i in range(n_cases)) and res.preprocessed_now
    plans = json.loads((pool / "ssl3dPlans.json").read_text())
    check_pool_complete(pool, plans)

    # a truncated array is found without decompressing anything and redone by a plain rerun
    b = data / "s2.b2nd"
    b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    with pytest.raises(BadInputError, match="truncated"):
        check_pool_complete(pool, plans)
    assert plan_and_preprocess(opts).preprocessed_now == ["s2"]
    check_pool_complete(pool, plans)

    # --verify reads every array: a truncated one whose pkl does not know its size (older pools) is redone too
    with open(data / "s3.pkl", "rb") as f:
        props = pickle.load(f)
    del props["ssl3d_file_sizes"]
    with open(data / "s3.pkl", "wb") as f:
        pickle.dump(props, f)
    b = data / "s3.b2nd"
    b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    assert plan_and_preprocess(opts).preprocessed_now == []  # a plain rerun cannot see it
    res = plan_and_preprocess(PlanOptions(**{**vars(opts), "verify": True}))
    assert verify_outputs(data, res.case_ids, progress=False) == {}

    # a case that left the pool loses its arrays; stale arrays put back are refused
    (scans / "s5.nii.gz").unlink()
    plan_and_preprocess(opts)
    assert not list(data.glob("s5*"))
    check_pool_complete(pool, plans := json.loads((pool / "ssl3dPlans.json").read_text()))
    shutil.copy(data / "s0.pkl", data / "old.pkl")
    with pytest.raises(BadInputError, match="not in manifest.json"):
        check_pool_complete(pool, plans)


# ---- pretraining -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretraining_kill_after_first_checkpoint_resumes(tiny_pool, tmp_path):
    import torch

    env = subprocess_env(tmp_path / "raw", tiny_pool.dataset_dir.parent, tmp_path / "res", n_proc_da="2")
    args = [str(BIN / "ssl_pretrain"), "-d", tiny_pool.dataset_dir.name, "-m", "spark", "-device", "cpu", "--size",
            "tiny", "--epochs", "3", "--iters", "2", "--val-iters", "1", "--batch-size", "2", "--no-progress",
            "--preview-every", "0", "--save-every", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold = tmp_path / "res" / tiny_pool.dataset_dir.name / "SparKPretrainer__ssl3dPlans__3d_fullres" / "fold_0"
    wait_until(lambda: (fold / "checkpoint_latest.pth").is_file(), 300, "the first checkpoint")
    tree = descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert_all_gone(tree)
    assert not (fold / "checkpoint_final.pth").exists()
    r = subprocess.run(args + ["--c"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    assert len(final["logging"]["train_losses"]) == 3


# ---- ssl_benchmark ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_kill_leaves_no_orphans_refuses_a_racing_rerun_and_resumes(tiny_pool, tiny_pretraining, tmp_path):
    from conftest import make_raw_dataset

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    make_raw_dataset(raw, 802, "Lab", n=3, labels=True)
    pre.mkdir()
    (pre / tiny_pool.dataset_dir.name).symlink_to(tiny_pool.dataset_dir)
    env = subprocess_env(raw, pre, tmp_path / "res", n_proc_da="0")
    out = tmp_path / "bench"
    cmd = [str(BIN / "ssl_benchmark"), "-u", tiny_pool.dataset_dir.name, "-l", "802", "-m", "spark", "-p",
           f"spark={tiny_pretraining}", "--n-train", "1", "--seeds", "1", "--ft-epochs", "1", "--ft-iters", "2",
           "--test-cases", "1", "--arms", "finetune",
           "-device", "cpu", "-np", "1", "--no-progress", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    arm = out / "arms" / "spark__n1__s0"
    # kill while the arm's nnUNetv2_train runs: its fold folder exists once nnU-Net starts training
    wait_until(lambda: any((arm / "nnUNet_results").glob("*/*/fold_0/training_log_*.txt")), 300,
               "nnUNetv2_train to start")
    tree = descendants(proc.pid)
    assert any("nnUNetv2_train" in Path(f"/proc/{p}/cmdline").read_text() for p in tree if alive(p))
    proc.kill()
    proc.wait()
    assert_all_gone(tree)
    assert not (arm / "result.json").exists()

    # a second benchmark on the same folder while the first runs is refused in one line
    r1 = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (out / ".owner.lock").read_text().strip() == str(r1.pid), 120, "the rerun to take the lock")
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 2 and "in use by another run" in r2.stderr and "Traceback" not in r2.stderr, r2.stderr
    assert r1.wait(timeout=600) == 0
    res = json.loads((arm / "result.json").read_text())
    assert res["status"] == "ok" and 0 <= res["mean_dice"] <= 1
    assert json.loads((out / "results.json").read_text())["arms"][0]["id"] == "spark__n1__s0"
