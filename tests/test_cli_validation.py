"""Every command checks its options, checkpoints, device, outputs and environment before any work: one line naming
the option or file and the problem, exit code 2, no traceback, nothing written; finished results are never
overwritten; ``--help`` and argument errors answer without importing torch or nnU-Net."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ct_volume, make_raw_dataset, write_image
from ssl3d.cli.common import setup_logging
from ssl3d.cli import (benchmark, extract_features, finetune, finetune_cls, make_demo_data, plan_and_preprocess,
                       predict, pretrain, validate)
from ssl3d.utils import BadInputError

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _keep_pythonwarnings(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # run_cli extends it


def call(main, argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc, err, culprit, problem):
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    assert culprit in errors[0] and problem in errors[0], errors[0]


def tree(*roots):
    """Every file and folder under ``roots`` with the content hash of each file (what "nothing written" compares)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# ---- option values: argparse types, one line before anything else --------------------------------------------
PT = ["-d", "900", "-m", "spark"]
FT = ["-d", "802", "-p", "results"]
CLS = ["-d", "803", "-p", "results"]
BM = ["-u", "900", "-l", "802", "-m", "spark", "-o", "bench"]
OPTIONS = [
    (pretrain.main, PT + ["--epochs", "0"], "--epochs", "at least 1"),
    (pretrain.main, PT + ["--epochs", "-1"], "--epochs", "at least 1"),
    (pretrain.main, PT + ["--iters", "0"], "--iters", "at least 1"),
    (pretrain.main, PT + ["--batch-size", "-2"], "--batch-size", "at least 1"),
    (pretrain.main, PT + ["-np", "0"], "-np", "at least 1"),
    (pretrain.main, PT + ["--lr", "-1"], "--lr", "positive"),
    (pretrain.main, PT + ["-f", "abc"], "-f/--fold", "not a fold"),
    (pretrain.main, PT + ["--mask-ratio", "1.5"], "--mask-ratio", "(0, 1)"),
    (pretrain.main, PT + ["--val-iters", "-1"], "--val-iters", "negative"),
    (pretrain.main, PT + ["--patch-size", "0", "32", "32"], "--patch-size", "at least 1"),
    (pretrain.main, PT + ["--method-kwargs", "{bad"], "--method-kwargs", "not valid JSON"),
    (pretrain.main, PT + ["--method-kwargs", "[1, 2]"], "--method-kwargs", "JSON object"),
    (pretrain.main, PT + ["-m", "bogus"], "-m/--method", "invalid choice"),
    (plan_and_preprocess.main, ["-i", "x", "--spacing", "-1", "1", "1"], "--spacing", "positive"),
    (plan_and_preprocess.main, ["-i", "x", "--patch-voxels", "-5"], "--patch-voxels", "at least 1"),
    (plan_and_preprocess.main, ["-i", "x", "--mask-cell-size", "0", "0", "0"], "--mask-cell-size", "at least 1"),
    (plan_and_preprocess.main, ["-i", "x", "-np", "0"], "-np", "at least 1"),
    (plan_and_preprocess.main, ["-i", "x", "--mask-ratio", "0"], "--mask-ratio", "(0, 1)"),
    (plan_and_preprocess.main, ["-i", "x", "--ct-window", "nan", "1"], "--ct-window", "finite"),
    (finetune.main, FT + ["--n-train", "0"], "--n-train", "at least 1"),
    (finetune.main, FT + ["--fraction", "1.5"], "--fraction", "(0, 1]"),
    (finetune.main, FT + ["--epochs", "-1"], "--epochs", "at least 1"),
    (finetune.main, FT + ["--batch-size", "0"], "--batch-size", "at least 1"),
    (finetune.main, FT + ["-f", "abc"], "-f", "not a fold"),
    (finetune.main, FT + ["--lr", "0"], "--lr", "positive"),
    (finetune_cls.main, CLS + ["--epochs", "-1"], "--epochs", "at least 1"),
    (finetune_cls.main, CLS + ["--val-fraction", "1.5"], "--val-fraction", "[0, 1)"),
    (finetune_cls.main, CLS + ["--fraction", "0"], "--fraction", "(0, 1]"),
    (finetune_cls.main, CLS + ["--n-train", "0"], "--n-train", "at least 1"),
    (finetune_cls.main, CLS + ["-f", "-1"], "-f", "negative"),
    (finetune_cls.main, CLS + ["--iters", "0"], "--iters", "at least 1"),
    (finetune_cls.main, CLS + ["--crop-size", "0", "32", "32"], "--crop-size", "at least 1"),
    (finetune_cls.main, CLS + ["--crop-size", "16", "x", "32"], "--crop-size", "not an integer"),
    (finetune_cls.main, CLS + ["--crop", "whole"], "--crop", "invalid choice"),
    (finetune_cls.main, CLS + ["--crop", "case", "--crop-size", "16", "32", "32"], "--crop-size", "not allowed with"),
    (finetune_cls.main, CLS + ["--mode", "linear", "--crop", "case", "-device", "cpu"], "--crop",
     "apply to --mode finetune and scratch"),
    (benchmark.main, BM + ["--seeds", "0"], "--seeds", "at least 1"),
    (benchmark.main, BM + ["--fractions", "1.5"], "--fractions", "(0, 1]"),
    (benchmark.main, BM + ["--n-train", "0"], "--n-train", "at least 1"),
    (benchmark.main, BM + ["--test-fraction", "1"], "--test-fraction", "(0, 1)"),
    (benchmark.main, BM + ["--ft-epochs", "0"], "--ft-epochs", "at least 1"),
    (benchmark.main, BM + ["--test-cases", "0"], "--test-cases", "at least 1"),
    (benchmark.main, BM + ["--arms", "linear"], "--arms", "invalid choice"),
    (benchmark.main, BM + ["--task", "cls", "--crop", "whole"], "--crop", "invalid choice"),
    (extract_features.main, ["-p", "r", "-i", "i", "-o", "o", "-f", "abc"], "-f", "not a fold"),
    (predict.main, ["-i", "i", "-o", "o", "-d", "802", "-f", "0", "x"], "-f", "not a fold"),
    (finetune.export_main, ["-p", "r", "-o", "w.pth", "--num-classes", "0"], "--num-classes", "at least 1"),
    (finetune.export_main, ["-p", "r", "-o", "w.pth", "-f", "-2"], "-f", "not a fold"),
    (make_demo_data.main, ["-nu", "-1"], "--n-unlabeled", "negative"),
]


@pytest.mark.parametrize("main,argv,culprit,problem", OPTIONS,
                         ids=[f"{m.__module__.rsplit('.', 1)[-1]}:{' '.join(a[-2:])}" for m, a, _, _ in OPTIONS])
def test_bad_option_value_is_one_line(main, argv, culprit, problem, capsys, nnunet_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    rc, err = call(main, argv, capsys)
    assert_one_line(rc, err, culprit, problem)
    assert tree(tmp_path) == before


# ---- checks at the start of a command body ------------------------------------------------------------------
def test_ct_window_order_checked_before_planning(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, err = call(plan_and_preprocess.main, ["-i", str(tmp_path), "-o", str(out), "--ct-window", "250", "-175"],
                   capsys)
    assert_one_line(rc, err, "--ct-window 250 -175", "LO must be below HI")
    assert not any(out.iterdir())


def test_mask_cell_not_a_multiple_of_the_stride_is_one_line(capsys, tmp_path):
    for i in range(2):
        write_image(tmp_path / "scans" / f"s{i}.nii.gz", ct_volume(i))
    out = tmp_path / "out"
    out.mkdir()
    rc, err = call(plan_and_preprocess.main, ["-i", str(tmp_path / "scans"), "-o", str(out), "--mask-cell-size", "3",
                                              "3", "3", "-np", "1", "--no-progress"], capsys)
    assert_one_line(rc, err, "--mask-cell-size 3 3 3", "multiple of the encoder's total stride")
    assert not any(out.iterdir())


def _pool_env(monkeypatch, tiny_pool, results):
    monkeypatch.setenv("nnUNet_preprocessed", str(tiny_pool.dataset_dir.parent))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_raw", str(results.parent / "raw"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


TINY = ["-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters", "1", "--val-iters", "1", "--batch-size", "2",
        "--no-progress", "--preview-every", "0"]


@pytest.mark.parametrize("extra,culprit,problem", [
    (["--patch-size", "33", "33", "33"], "--patch-size 33 33 33", "divisible"),
    (["--size", "bogus"], "--size", "unknown size 'bogus'"),
    (["--method-kwargs", '{"no_such_option": 1}'], "--method-kwargs", "no_such_option"),
    (["--c", "--overwrite"], "--c and --overwrite", "exclude"),
    (["UNSET"], "nnUNet_results", "not set"),
])
def test_pretrain_options_checked_against_pool_and_method(extra, culprit, problem, tiny_pool, tmp_path, capsys,
                                                          monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    _pool_env(monkeypatch, tiny_pool, results)
    if extra == ["UNSET"]:
        monkeypatch.delenv("nnUNet_results")
        extra = []
    before = tree(tiny_pool.dataset_dir)
    rc, err = call(pretrain.main, ["-d", tiny_pool.dataset_dir.name, "-m", "spark", *TINY, *extra], capsys)
    assert_one_line(rc, err, culprit, problem)
    assert not any(results.iterdir()) and tree(tiny_pool.dataset_dir) == before


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("main,argv", [
    (pretrain.main, ["-d", "900", "-m", "spark"]),
    (finetune.main, ["-d", "802", "-p", "r"]),
    (finetune_cls.main, ["-d", "803", "-p", "r"]),
    (extract_features.main, ["-p", "r", "-i", "i", "-o", "o"]),
    (predict.main, ["-i", "nnUNet_raw/Dataset802_Seg/imagesTr", "-o", "o", "-d", "802"]),
    (benchmark.main, ["-u", "900", "-l", "802", "-m", "spark", "-o", "bench"]),
], ids=["pretrain", "finetune", "finetune_cls", "extract_features", "predict", "benchmark"])
def test_cuda_without_gpu_is_one_line(main, argv, capsys, nnunet_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if main is predict.main:  # its input folder and model are looked up first
        make_raw_dataset(nnunet_env["nnUNet_raw"], 802, "Seg", n=1, labels=True)
        (nnunet_env["nnUNet_results"] / "Dataset802_Seg" / "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres" /
         "fold_0").mkdir(parents=True)
    before = tree(tmp_path)
    rc, err = call(main, [*argv, "-device", "cuda"], capsys)
    assert_one_line(rc, err, "-device cuda", "not available")
    assert tree(tmp_path) == before


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_triton_backend_where_it_cannot_run_is_one_line(capsys, nnunet_env, tmp_path, monkeypatch):
    from ssl3d.sparse import triton_backend

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(triton_backend, "interpreter_active", lambda: False)  # as without TRITON_INTERPRET=1
    before = tree(tmp_path)
    rc, err = call(pretrain.main, PT + ["-device", "cpu", "--backend", "triton"], capsys)
    assert_one_line(rc, err, "--backend triton", "TRITON_INTERPRET")
    assert tree(tmp_path) == before


def test_unwritable_or_file_outputs_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        validate.check_writable(tmp_path / "afile" / "out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BadInputError, match="not writable"):
            validate.check_writable(locked / "new" / "out")
    validate.check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()


# ---- checkpoints and results folders of pretrainings -----------------------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


BROKEN = {  # kind -> (damage to a copy of a finished tiny pretraining, culprit in the line, problem)
    "truncated": (lambda r: _truncate(r / "fold_0" / "checkpoint_final.pth"), "checkpoint_final.pth",
                  "unreadable or truncated checkpoint"),
    "zero-byte": (lambda r: (r / "fold_0" / "checkpoint_final.pth").write_bytes(b""), "checkpoint_final.pth",
                  "zero-byte"),
    "keyless": (lambda r: torch.save({"weights": 1}, r / "fold_0" / "checkpoint_final.pth"), "checkpoint_final.pth",
                "no 'network_weights'"),
    "broken-description": (lambda r: (r / "fold_0" / "ssl_method.json").write_text("{\"name\": "),
                           "fold_0/ssl_method.json", "broken JSON"),
    "no-plans": (lambda r: [(r / "fold_0" / "plans.json").unlink(), (r / "plans.json").unlink()], "plans.json",
                 "missing"),
    "not-a-results-folder": (lambda r: [p.unlink() for p in r.rglob("ssl_method.json")], "", "no ssl_method.json"),
}


@pytest.fixture(scope="module")
def broken_results(tiny_pretraining, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for kind, (damage, _, _) in BROKEN.items():
        out[kind] = shutil.copytree(tiny_pretraining, root / kind / tiny_pretraining.name)
        damage(out[kind])
    return out


def _consumers(results, tmp_path):
    """argv of every command that reads a pretraining, and what each must not have written."""
    raw = tmp_path / "nnUNet_raw"
    make_raw_dataset(raw, 802, "Seg", n=2, labels=True)
    make_raw_dataset(raw, 803, "Cls", n=4)
    csv = tmp_path / "cases.csv"
    csv.write_text("case_id,label\ncase000,0\ncase001,1\ncase002,0\ncase003,1\n")
    return {
        "ssl_export_weights": (finetune.export_main, ["-p", str(results), "-o", str(tmp_path / "w" / "w.pth")]),
        "ssl_finetune": (finetune.main, ["-d", "802", "-p", str(results), "-device", "cpu"]),
        "ssl_finetune_cls": (finetune_cls.main, ["-d", "803", "-p", str(results), "--labels", str(csv), "-device",
                                                 "cpu", "--no-progress"]),
        "ssl_extract_features": (extract_features.main, ["-p", str(results), "-i", str(raw / "Dataset802_Seg"),
                                                         "-o", str(tmp_path / "feats"), "-device", "cpu"]),
    }


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_pretraining_is_one_line_in_every_command(kind, broken_results, capsys, nnunet_env, tmp_path):
    _, culprit, problem = BROKEN[kind]
    results = broken_results[kind]
    before = tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"], results)
    for name, (main, argv) in _consumers(results, tmp_path).items():
        rc, err = call(main, argv, capsys)
        assert_one_line(rc, err, culprit, problem)
        assert tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"], results) == before, name
        assert not (tmp_path / "w").exists() and not (tmp_path / "feats").exists(), name


def test_cls_crop_the_network_cannot_take_is_one_line_before_any_work(tiny_pretraining, capsys, nnunet_env,
                                                                     tmp_path):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 803, "Cls", n=4)
    csv = tmp_path / "cases.csv"
    csv.write_text("case_id,label\ncase000,0\ncase001,1\ncase002,0\ncase003,1\n")
    before = tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"])
    rc, err = call(finetune_cls.main, ["-d", "803", "-p", str(tiny_pretraining), "--labels", str(csv), "-device",
                                       "cpu", "--no-progress", "--crop-size", "15", "31", "31"], capsys)
    assert_one_line(rc, err, "--crop-size 15 31 31", "needs a multiple of")
    assert tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"]) == before


def test_each_fold_keeps_its_own_method_description(tiny_pretraining, tmp_path, capsys):
    """Fold 3 trained with another --size rewrites the shared ssl_method.json; fold 0 still exports. Results
    without a per-fold copy (older runs) are read through the shared one."""
    results = shutil.copytree(tiny_pretraining, tmp_path / "r")
    shared = json.loads((results / "ssl_method.json").read_text())
    (results / "ssl_method.json").write_text(json.dumps({**shared, "method_kwargs": {}}))  # size 'planned'
    rc, err = call(finetune.export_main, ["-p", str(results), "-o", str(tmp_path / "w.pth")], capsys)
    assert rc == 0, err
    (results / "fold_0" / "ssl_method.json").unlink()
    rc, err = call(finetune.export_main, ["-p", str(results), "-o", str(tmp_path / "w2.pth")], capsys)
    assert_one_line(rc, err, "checkpoint_final.pth", "does not match")
    assert not (tmp_path / "w2.pth").exists()


# ---- finished work is never overwritten ------------------------------------------------------------------------
@pytest.fixture
def finished(tiny_pretraining, tiny_pool, tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(tiny_pretraining.parent.parent, results)
    _pool_env(monkeypatch, tiny_pool, results)
    return results / tiny_pool.dataset_dir.name / tiny_pretraining.name / "fold_0"


def test_pretrain_refuses_a_finished_result_and_c_reports_it(finished, tiny_pool, capsys):
    argv = ["-d", tiny_pool.dataset_dir.name, "-m", "spark", *TINY]
    before = tree(finished)
    rc, err = call(pretrain.main, argv, capsys)
    assert_one_line(rc, err, "checkpoint_final.pth", "pass --c to continue it")
    assert tree(finished) == before
    rc, err = call(pretrain.main, argv + ["--c"], capsys)
    assert rc == 0 and "already finished" in err, err
    assert tree(finished) == before, "a finished run continued without more epochs must stay untouched"
    rc, err = call(pretrain.main, ["-d", tiny_pool.dataset_dir.name, "-m", "spark", "-device", "cpu", "--c"], capsys)
    assert_one_line(rc, err, "checkpoint_final.pth", "does not match the network of -m spark {}")  # not --size tiny
    assert tree(finished) == before


def test_pretrain_c_falls_back_to_the_newest_readable_checkpoint(finished, tiny_pool, capsys):
    (finished / "checkpoint_final.pth").unlink()  # killed before the end ...
    latest = finished / "checkpoint_latest.pth"
    shutil.copyfile(finished / "checkpoint_best.pth", latest)
    _truncate(latest)  # ... while nnU-Net was writing checkpoint_latest
    setup_logging()  # make_trainer without run_cli: log to this test's stderr
    trainer = pretrain.make_trainer(pretrain.build_parser().parse_args(
        ["-d", tiny_pool.dataset_dir.name, "-m", "spark", *TINY, "--epochs", "2", "--c"]))
    err = capsys.readouterr().err
    assert trainer.current_epoch == 1  # from checkpoint_best (epoch 0 done)
    warnings = [ln for ln in err.splitlines() if "checkpoint_latest.pth" in ln]
    assert len(warnings) == 1 and "unreadable or truncated" in warnings[0] and "checkpoint_best.pth" in warnings[0]
    (finished / "checkpoint_best.pth").write_bytes(b"")
    rc, err = call(pretrain.main, ["-d", tiny_pool.dataset_dir.name, "-m", "spark", *TINY, "--c"], capsys)
    assert_one_line(rc, err, "checkpoint_latest.pth", "no readable checkpoint")


def test_finetune_refuses_a_finished_fold_and_c_reports_it(tiny_pretraining, nnunet_env, capsys):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 802, "Seg", n=2, labels=True)
    fold = (nnunet_env["nnUNet_results"] / "Dataset802_Seg" / "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres" /
            "fold_0")
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"a finished fine-tuning")
    before = tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"])
    argv = ["-d", "802", "-p", str(tiny_pretraining), "-device", "cpu", "-np", "1"]
    rc, err = call(finetune.main, argv, capsys)
    assert_one_line(rc, err, "checkpoint_final.pth", "finished result")
    rc, err = call(finetune.main, argv + ["--c"], capsys)
    assert rc == 0 and "already finished" in err, err
    assert tree(nnunet_env["nnUNet_preprocessed"], nnunet_env["nnUNet_results"]) == before


def test_checkpoints_are_renamed_into_place(tmp_path):
    """A kill while nnU-Net writes a checkpoint leaves the previous one intact."""
    from ssl3d.training.checkpoints import AtomicCheckpointMixin

    class Base:
        def save_checkpoint(self, filename):
            Path(filename).write_bytes(b"half a checkpo")
            raise KeyboardInterrupt

    class Trainer(AtomicCheckpointMixin, Base):
        pass

    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(KeyboardInterrupt):
        Trainer().save_checkpoint(str(target))
    assert target.read_bytes() == b"the previous checkpoint"


def test_other_ranks_never_touch_rank_0s_partial_checkpoint(tmp_path):
    """Under DDP nnU-Net writes on local rank 0 only: rank 1 must neither load nor rename the .partial file rank 0
    is still writing (it did: EOFError on rank 1 in the DDP pretraining tests, or a truncated checkpoint)."""
    from ssl3d.training.checkpoints import PARTIAL_SUFFIX, CheckpointExtrasMixin

    class Base:
        def save_checkpoint(self, filename):
            if self.local_rank == 0:
                Path(filename).write_bytes(b"complete")

    class Trainer(CheckpointExtrasMixin, Base):
        def checkpoint_extras(self):
            return {"x": 1}  # would torch.load the partial file

    target = tmp_path / "checkpoint_latest.pth"
    partial = tmp_path / ("checkpoint_latest.pth" + PARTIAL_SUFFIX)
    partial.write_bytes(b"half of rank 0's wri")  # rank 0 is still writing it
    rank1 = Trainer()
    rank1.local_rank = 1
    rank1.save_checkpoint(str(target))
    assert partial.read_bytes() == b"half of rank 0's wri" and not target.exists()


# ---- start-up --------------------------------------------------------------------------------------------------
COMMANDS = {"ssl_pretrain": "pretrain", "ssl_finetune": "finetune", "ssl_finetune_cls": "finetune_cls",
            "ssl_plan_and_preprocess": "plan_and_preprocess", "ssl_benchmark": "benchmark", "ssl_predict": "predict",
            "ssl_extract_features": "extract_features", "ssl_make_demo_data": "make_demo_data",
            "ssl_export_weights": "finetune:export_main"}
PROBE = """
import importlib, sys
for name, target in {commands!r}.items():
    module, _, fn = target.partition(":")
    main = getattr(importlib.import_module("ssl3d.cli." + module), fn or "main")
    for argv in (["--help"], ["--no-such-option"]):
        try:
            main(argv)
        except SystemExit:
            pass
    heavy = [m for m in ("torch", "nnunetv2", "dynamic_network_architectures") if m in sys.modules]
    if heavy:  # one interpreter, commands in turn: the first command that loads one is the culprit
        print("HEAVY", name, heavy)
        break
"""


def test_help_and_argument_errors_do_not_import_torch():
    r = subprocess.run([sys.executable, "-c", PROBE.format(commands=COMMANDS)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY" not in r.stdout, r.stdout.splitlines()[-1]


def test_light_tables_match_the_real_ones():
    from ssl3d.evaluation.protocol import PRESETS
    from ssl3d.training.method_names import METHOD_DESCRIPTIONS
    from ssl3d.training.methods import available_methods

    real = available_methods()
    assert {k: real[k] for k in METHOD_DESCRIPTIONS} == METHOD_DESCRIPTIONS
    assert set(real) - set(METHOD_DESCRIPTIONS) <= {"throwaway"}, "add new methods to ssl3d.training.method_names"
    assert tuple(sorted(PRESETS)) == benchmark.PRESET_NAMES
