"""``run_benchmark``: pretrain each method once, fine-tune every arm with stock nnU-Net, predict the held-out test
set, score with nnU-Net's evaluation (``task="seg"``); or classify with ``ssl_finetune_cls`` per arm and score the
fold's held-out cases (``task="cls"``, :class:`ClsBenchmark`). Every step is a resumable unit whose result file is
written last.

Isolation: everything lives under the output folder. The pool's preprocessed dataset is linked into
``<out>/nnUNet_preprocessed`` (read only); the labeled dataset is planned and preprocessed there with a split
whose training cases exclude the test set; every arm trains into its own ``nnUNet_results``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ssl3d.data.case_labels import fold_split, label_subset, read_case_labels
from ssl3d.data.labeled import (check_cases, check_encoder_channels, check_images, check_labeled_dataset,
                                encoder_channels, label_values)
from ssl3d.data.readers import discover_inputs, find_raw_dataset
from ssl3d.evaluation.convergence import score_curve
from ssl3d.evaluation.protocol import (CLS_PRESETS, PRESETS, PRETRAIN_KEYS, Arm, ClsArm, HeldOutSplit, arm_record,
                                       plan_arms, plan_cls_arms, setting_changes, split_test, training_cases)
from ssl3d.evaluation.report import write_cls_reports, write_reports
from ssl3d.evaluation.seg_metrics import nsd_tolerances, score_folder
from ssl3d.inference.nnunet_bridge import nnunet_dataset_name, run_nnunet
from ssl3d.inference.process_guard import owner_lock
from ssl3d.preprocessing.pipeline import find_preprocessed_dataset
from ssl3d.training.external import load_pretrained
from ssl3d.training.methods import get_method_spec
from ssl3d.utils import DEFAULT_SEED, BadInputError, env_dir, read_json, write_json

logger = logging.getLogger(__name__)

OWNER_LOCK = ".owner.lock"


@dataclass
class BenchmarkConfig:
    pool: str  # preprocessed unlabeled pool (ssl_pretrain -d), id or name
    labeled: str  # nnU-Net raw labeled dataset, id or name
    methods: list[str]
    output: Path
    scratch: bool = True
    n_train: list[str] = field(default_factory=lambda: ["1", "2", "all"])
    seeds: int = 3
    preset: str = "small"
    device: str = "cpu"
    test: Path | None = None
    test_fraction: float | None = None  # else the preset's test_cases held out (else a third)
    pretrained: dict[str, Path] = field(default_factory=dict)  # method -> finished pretraining results folder
    num_processes: int = 2
    overrides: dict = field(default_factory=dict)  # preset keys set on the command line
    cka: bool = False  # feature reuse: linear CKA pretrained vs fine-tuned encoder per stage
    progress: bool = True
    task: str = "seg"  # seg: nnU-Net segmentation arms; cls: ssl_finetune_cls arms
    fractions: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1, 0.05])  # cls label budgets
    linear: bool = False  # cls: a linear probe arm per method next to fine-tuning
    labels_csv: Path | None = None  # cls: case labels (default: the dataset.json's ssl3d_case_labels)
    fold: int = 0  # cls: the stratified fold whose held-out cases every arm scores

    def setting(self) -> dict:
        if self.preset not in PRESETS:
            raise BadInputError(None, f"unknown preset '{self.preset}' ({', '.join(PRESETS)})")
        base = PRESETS[self.preset]
        if self.task == "cls":  # pretraining exactly as for seg; the fine-tuning keys are classification's
            base = {k: base[k] for k in PRETRAIN_KEYS} | CLS_PRESETS[self.preset]
        return {**base, **{k: v for k, v in self.overrides.items() if v is not None}}


class Benchmark:
    def __init__(self, cfg: BenchmarkConfig):
        self._setup(cfg)
        self.labeled = nnunet_dataset_name(cfg.labeled)
        self.raw_labeled = self.raw / self.labeled
        max_n = max((int(k) for k in cfg.n_train if str(k) != "all"), default=1)
        n_enc = encoder_channels(read_json(self.pool_dir / "ssl3dPlans.json"))
        _, dj = check_labeled_dataset(self.raw_labeled, n_enc, cfg.num_processes)  # every image and label first
        n_test = self.s.get("test_cases") if cfg.test_fraction is None else None
        self.split: HeldOutSplit = split_test(self.raw_labeled, Path(cfg.test) if cfg.test else None,
                                           1 / 3 if cfg.test_fraction is None else cfg.test_fraction, max_n, n_test)
        if cfg.test:
            check_cases([(c, [str(f) for f in self.split.test_images[c]], str(self.split.test_labels[c]))
                         for c in sorted(self.split.test_labels)], label_values(dj, self.raw_labeled / "dataset.json"),
                        cfg.num_processes)
        self.arms = plan_arms(cfg.methods, cfg.scratch, cfg.n_train, range(cfg.seeds), len(self.split.trainable),
                              self.s.get("arms") or ["finetune"])
        self.fg_labels = {int(v): k for k, v in dj["labels"].items() if isinstance(v, int) and v != 0}
        self.file_ending = dj.get("file_ending", ".nii.gz")
        self.nsd_tolerances = nsd_tolerances(dj, self.fg_labels, self.raw_labeled / "dataset.json")  # before any run
        refuse_mixed_rerun(self.out, setting=self.s, split={"trainable": self.split.trainable,
                                                            "test": sorted(self.split.test_labels)})

    # ---- set-up ------------------------------------------------------------------------------------------
    def _setup(self, cfg: BenchmarkConfig) -> None:
        """What both tasks share: settings, nnU-Net folders, known methods, the pool and the child environment."""
        self.cfg = cfg
        self.s = cfg.setting()
        self.out = Path(cfg.output).resolve()
        raw = env_dir("nnUNet_raw")
        pre = env_dir("nnUNet_preprocessed")
        if raw is None or pre is None:
            raise BadInputError(None, "set nnUNet_raw and nnUNet_preprocessed")
        self.raw = raw
        # -p m=<file>: a foreign checkpoint (nnssl, MONAI), read and checked now (one line if bad); its fine-tuning
        # plans are named after what it holds (ssl_finetune's ssl3d_<name>Plans)
        self.foreign = {m: load_pretrained(p).method_name for m, p in cfg.pretrained.items() if Path(p).is_file()}
        for m in list(cfg.methods) + list(cfg.pretrained):
            if m not in self.foreign:
                get_method_spec(m)  # unknown methods fail before anything runs
        self.pool_dir = find_preprocessed_dataset(cfg.pool, pre)
        if not (self.pool_dir / "ssl3dPlans.json").is_file():
            raise BadInputError(self.pool_dir, "no ssl3d plans here (run ssl_plan_and_preprocess)")
        self.pre_root = self.out / "nnUNet_preprocessed"
        self.lock_fds: tuple[int, ...] = ()  # the running arm's owner lock, inherited by its subprocesses
        self.env = {"nnUNet_preprocessed": str(self.pre_root), "nnUNet_raw": str(raw),
                    "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "1"), "nnUNet_compile": "false"}

    def link_pool(self) -> None:
        """The pool, read only, inside the benchmark's own nnUNet_preprocessed (pretraining reads it there)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.pre_root.mkdir(exist_ok=True)
        link = self.pre_root / self.pool_dir.name
        if not link.exists():
            link.symlink_to(self.pool_dir, target_is_directory=True)

    def prepare(self) -> None:
        self.link_pool()
        test_dir = self.out / "test"
        for kind in ("images", "labels"):
            (test_dir / kind).mkdir(parents=True, exist_ok=True)
        for case, files in self.split.test_images.items():
            for f in files:
                _link(test_dir / "images" / f.name, f)
            _link(test_dir / "labels" / self.split.test_labels[case].name, self.split.test_labels[case])
        # nnU-Net reads fold 0 from here: training candidates only; the test cases are in no list
        splits = [{"train": self.split.trainable, "val": self.split.trainable}]
        (self.pre_root / self.labeled).mkdir(exist_ok=True)
        write_json(self.pre_root / self.labeled / "splits_final.json", splits)
        write_json(self.out / "protocol.json", {"config": _jsonable(self.cfg), "setting": self.s,
                                                "labeled_dataset": self.labeled, "pool": self.pool_dir.name,
                                                "split": self.split.to_json(),
                                                "arms": [arm_record(a) | {"train_cases": training_cases(
                                                    self.split, a)} for a in self.arms]})

    # ---- pretraining -------------------------------------------------------------------------------------
    def pretrain(self, method: str) -> dict:
        done = self.out / "pretraining" / f"{method}.json"
        if done.is_file():
            return read_json(done)
        if method in self.cfg.pretrained:
            given = Path(self.cfg.pretrained[method]).resolve()
            info = {"method": method, "results": str(given), "given": True,
                    **({"plans_method": self.foreign[method]} if method in self.foreign else {})}
            quality = given / "fold_0" / "reconstruction_quality.json"
            if quality.is_file():
                info["reconstruction"] = read_json(quality)
            write_json(done, info)
            return info
        res_root = self.out / "pretraining" / "nnUNet_results"
        trainer = get_method_spec(method).trainer_name
        folder = res_root / self.pool_dir.name / f"{trainer}__ssl3dPlans__3d_fullres"
        cmd = pretrain_command(self.pool_dir.name, method, self.cfg.device, self.s)
        if any((folder / "fold_0").glob("checkpoint_*.pth")):
            cmd.append("--c")  # killed earlier: continue (or report the finished run), never overwrite it
        log = self.out / "pretraining" / f"{method}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with owner_lock(log.with_suffix(".lock"), folder) as fd:
            rc = run_nnunet(cmd, log_file=log, env_overrides={**self.env, "nnUNet_results": str(res_root)},
                            pass_fds=(fd,))
        if rc != 0 or not (folder / "fold_0" / "checkpoint_final.pth").is_file():
            raise BenchmarkStepError(f"pretraining {method} failed (exit {rc}); see {log}")
        ckpt = folder / "fold_0" / "checkpoint_final.pth"
        info = {"method": method, "results": str(folder), "wall_s": round(time.time() - start, 1), "log": str(log),
                **_pretraining_losses(ckpt)}
        quality = folder / "fold_0" / "reconstruction_quality.json"
        if quality.is_file():
            info["reconstruction"] = read_json(quality)
        write_json(done, info)
        return info

    # ---- one arm -----------------------------------------------------------------------------------------
    def run_arm(self, arm: Arm | ClsArm, pretrained: dict) -> dict:
        """One arm, run once: a finished arm's ``result.json`` is read back, so a rerun resumes arm by arm."""
        folder = self.out / "arms" / arm.id
        done = folder / "result.json"
        if done.is_file():
            return read_json(done)
        folder.mkdir(parents=True, exist_ok=True)
        # the lock goes with the arm's subprocesses: while any of them lives (even orphaned) no rerun races it
        with owner_lock(folder / OWNER_LOCK, folder) as fd:
            self.lock_fds = (fd,)
            result = {**arm_record(arm), "status": "ok", **self.train_and_score(arm, pretrained, folder)}
            write_json(done, result)
        self.lock_fds = ()
        return result

    def train_and_score(self, arm: Arm, pretrained: dict, folder: Path) -> dict:
        """Fine-tune with ``ssl_finetune``, predict the test cases with stock ``nnUNetv2_predict``, score them."""
        log = folder / "run.log"
        s = self.s
        env = {**self.env, "nnUNet_results": str(folder / "nnUNet_results")}
        # --c: an arm killed after its training continues it or takes the finished fold, never overwrites it
        cmd = ["ssl_finetune", "-d", self.labeled, "-p", pretrained["results"], "-f", "0", "--c",
               "-device", self.cfg.device, "--epochs", str(s["ft_epochs"]), "--iters", str(s["ft_iters"]),
               "--val-iters", str(s["ft_val_iters"]),
               "--batch-size", str(s["ft_batch"]), "--seed", str(arm.seed), "--no-final-val",
               "-np", str(self.cfg.num_processes), "--warmup", s["warmup"],
               "--encoder-lr-factor", str(s["encoder_lr_factor"]), "--optimizer", s.get("optimizer", "auto")]
        cmd += [] if arm.n_label == "all" else ["--n-train", str(arm.n_train)]
        cmd += ["--scratch"] if arm.scratch else []
        cmd += ["--freeze-encoder"] if arm.mode == "frozen" else []
        cmd += ["--lr", str(s["ft_lr"])] if s["ft_lr"] else []
        cmd += ["--checkpoints-at", *map(str, s["ft_checkpoints_at"])] if s.get("ft_checkpoints_at") else []
        t0 = time.time()
        if run_nnunet(cmd, log_file=log, env_overrides=env, pass_fds=self.lock_fds) != 0:
            raise BenchmarkStepError(f"fine-tuning {arm.id} failed; see {log}")
        t1 = time.time()
        plans = f"ssl3d_{pretrained.get('plans_method', arm.base)}Plans" + ("_scratch" if arm.scratch else "")
        pred = folder / "predictions"
        self.predict(arm, plans, "checkpoint_final.pth", pred, env, log)
        t2 = time.time()
        scores = self.evaluate(pred)
        curve = self.convergence_curve(arm, plans, folder, env, log, scores) if s.get("ft_checkpoints_at") else None
        return {"train_cases": training_cases(self.split, arm), "plans": plans, **scores,
                **({"curve": curve} if curve else {}), "finetune_s": round(t1 - t0, 1),
                "predict_s": round(t2 - t1, 1), "log": str(log)}

    def predict(self, arm: Arm, plans: str, checkpoint: str, pred: Path, env: dict, log: Path) -> None:
        """Stock ``nnUNetv2_predict`` of the held-out test images with one checkpoint of the arm's fold."""
        cmd = ["nnUNetv2_predict", "-i", str(self.out / "test" / "images"), "-o", str(pred), "-d", self.labeled,
               "-c", "3d_fullres", "-p", plans, "-tr", "SSLFinetuneTrainer", "-f", "0", "-chk",
               checkpoint, "-device", self.cfg.device, "-npp", "1", "-nps", "1"]
        cmd += [] if self.s["tta"] else ["--disable_tta"]
        if run_nnunet(cmd, log_file=log, env_overrides=env, pass_fds=self.lock_fds) != 0:
            raise BenchmarkStepError(f"prediction {arm.id} ({checkpoint}) failed; see {log}")

    def convergence_curve(self, arm: Arm, plans: str, folder: Path, env: dict, log: Path, final: dict) -> list[dict]:
        """Held-out Dice of the arm's intermediate checkpoints (``ft_checkpoints_at``), then of its final one."""
        fold = folder / "nnUNet_results" / self.labeled / f"SSLFinetuneTrainer__{plans}__3d_fullres" / "fold_0"

        def score(ckpt: Path) -> dict:
            pred = folder / f"predictions_{ckpt.stem.rsplit('_', 1)[-1]}"
            self.predict(arm, plans, ckpt.name, pred, env, log)
            return self.evaluate(pred)
        return score_curve(fold, self.s["ft_epochs"], self.s["ft_iters"], final, score)

    def evaluate(self, pred: Path) -> dict:
        """Per-case and mean Dice (nnU-Net's evaluation), NSD and HD95 (MONAI) per class on the test cases."""
        return score_folder(self.out / "test" / "labels", pred, self.fg_labels, self.nsd_tolerances, self.file_ending)

    # ---- everything --------------------------------------------------------------------------------------
    def run(self) -> dict:
        with self.owned():
            return self._run()

    @contextmanager
    def owned(self) -> Iterator[None]:
        """One live ssl_benchmark per output folder: a second start is refused, not raced."""
        self.out.mkdir(parents=True, exist_ok=True)
        with owner_lock(self.out / OWNER_LOCK, self.out):
            yield

    def _run(self) -> dict:
        self.prepare()
        results, failures, pre = self.run_steps()
        cka = self.feature_reuse(results, pre) if self.cfg.cka else None
        return write_reports(self.out, results, failures, pre, self.cfg.methods,
                             len(self.split.trainable), len(self.split.test_labels), self.s, cka)

    def run_steps(self) -> tuple[list[dict], list[dict], dict]:
        """Pretrain each method once, then run every arm (``self.run_arm``) under one progress bar; a failed
        step is recorded with its error and the others go on. Returns results, failures, pretraining infos."""
        methods = sorted({a.base for a in self.arms})
        total = len(methods) + len(self.arms)
        results, failures, pre = [], [], {}
        with tqdm(total=total, desc="benchmark", unit="step", disable=not self.cfg.progress) as bar:
            for m in methods:
                bar.set_postfix_str(f"pretrain {m}")
                try:
                    pre[m] = self.pretrain(m)
                except BenchmarkStepError as e:
                    failures.append({"step": f"pretrain {m}", "error": str(e)})
                    logger.error("%s", e)
                bar.update(1)
            for arm in self.arms:
                bar.set_postfix_str(arm.id)
                if arm.base not in pre:
                    failures.append({"step": arm.id, "error": f"no pretraining for {arm.base}"})
                else:
                    try:
                        results.append(self.run_arm(arm, pre[arm.base]))
                    except BenchmarkStepError as e:
                        failures.append({"step": arm.id, "error": str(e)})
                        logger.error("%s", e)
                bar.update(1)
        return results, failures, pre

    def feature_reuse(self, results: list[dict], pre: dict) -> list[dict]:
        from ssl3d.evaluation.report import curve_label
        from ssl3d.evaluation.similarity import feature_reuse, plot_cka

        rows = feature_reuse(self.out, results, pre, self.labeled, sorted(self.split.test_labels))
        write_json(self.out / "cka.json", rows)
        if rows:
            plot_cka(rows, {r["id"]: curve_label(r, self.cfg.methods) for r in results}, self.out / "cka.png")
        return rows


class BenchmarkStepError(RuntimeError):
    """One step failed; the benchmark records it with its log and goes on with the other arms."""


class ClsBenchmark(Benchmark):
    """Classification arms: each runs ``ssl_finetune_cls`` as a subprocess (a crash of one arm cannot take the
    others down) into its own ``nnUNet_results``; pretraining is the segmentation benchmark's own step.

    Every arm scores the same cases: the held-out cases of stratified fold ``cfg.fold``, which
    ``run_classification`` draws with the fixed default seed; the arm's seed only draws its label budget (a
    nested, stratified prefix of the fold's training cases), initialisation and data order."""

    def __init__(self, cfg: BenchmarkConfig):
        self._setup(cfg)
        self.raw_labeled = find_raw_dataset(str(cfg.labeled))
        self.labeled = self.raw_labeled.name
        cases, channels = discover_inputs([str(self.raw_labeled)])
        check_encoder_channels(len(channels), encoder_channels(read_json(self.pool_dir / "ssl3dPlans.json")),
                               self.raw_labeled / "dataset.json")
        check_images(cases, cfg.num_processes)
        self.labels, self.class_names = read_case_labels(self.raw_labeled / "dataset.json",
                                                         [c.case_id for c in cases], cfg.labels_csv)
        self.train, self.test = fold_split(self.labels, cfg.fold, DEFAULT_SEED)  # as run_classification splits
        self.arms = plan_cls_arms(cfg.methods, cfg.scratch, cfg.linear, cfg.fractions, range(cfg.seeds))
        self.budgets: dict[tuple[float, int], list[str]] = {}
        for a in self.arms:  # every budget is checked before anything trains
            try:
                self.budgets[(a.fraction, a.seed)] = label_subset(self.labels, self.train, a.seed,
                                                                  fraction=a.fraction)
            except BadInputError as e:
                raise BadInputError(None, f"--fractions {a.fraction:g}: {e.problem}") from None
        refuse_mixed_rerun(self.out, setting=self.s, train=self.train, test=self.test)

    def prepare(self) -> None:
        self.link_pool()
        write_json(self.out / "protocol.json", {
            "task": "cls", "config": _jsonable(self.cfg), "setting": self.s, "labeled_dataset": self.labeled,
            "pool": self.pool_dir.name, "fold": self.cfg.fold, "classes": self.class_names, "train": self.train,
            "test": self.test,
            "arms": [arm_record(a) | {"budget_cases": self.budgets[(a.fraction, a.seed)]} for a in self.arms]})

    def train_and_score(self, arm: ClsArm, pretrained: dict, folder: Path) -> dict:
        """Train (or probe) with ``ssl_finetune_cls`` and read back its scores of the fold's held-out cases."""
        log, res_root = folder / "run.log", folder / "nnUNet_results"
        t0 = time.time()
        if not _cls_result_files(res_root):  # else the arm finished but the benchmark was killed before noting it
            s = self.s
            cmd = ["ssl_finetune_cls", "-d", str(self.raw_labeled), "-p", pretrained["results"], "-f",
                   str(self.cfg.fold), "--mode", arm.mode, "-device", self.cfg.device, "--epochs", str(s["ft_epochs"]),
                   "--iters", str(s["ft_iters"]), "--lr", str(s["ft_lr"]), "--batch-size", str(s["ft_batch"]),
                   "--encoder-lr-factor", str(s["encoder_lr_factor"]), "--l2", str(s["l2"]),
                   "--val-fraction", str(s["val_fraction"]), "--fraction", repr(arm.fraction), "--seed",
                   str(arm.seed), "-np", str(self.cfg.num_processes), "--no-progress"]
            cmd += ["--labels", str(Path(self.cfg.labels_csv).resolve())] if self.cfg.labels_csv else []
            # a killed arm continues from its latest checkpoint; probes of one encoder embed each case once
            cmd += ["--embedding-cache", str(self.out / "embeddings" / arm.method)] if arm.mode == "linear" else \
                ["--c", "--crop", s.get("crop", "patch")]
            rc = run_nnunet(cmd, log_file=log, env_overrides={**self.env, "nnUNet_results": str(res_root)},
                            pass_fds=self.lock_fds)
            if rc != 0:
                raise BenchmarkStepError(f"classification {arm.id} failed (exit {rc}); see {log}")
        found = _cls_result_files(res_root)
        if len(found) != 1:
            raise BenchmarkStepError(f"classification {arm.id}: expected one cls_results.json, found {len(found)}; "
                                     f"see {log}")
        r = read_json(found[0])
        budget = self.budgets[(arm.fraction, arm.seed)]
        if sorted(r["test_cases"]) != sorted(self.test) or r["n_budget"] != len(budget):
            raise BenchmarkStepError(f"classification {arm.id} scored other cases or another budget than planned")
        m = r["metrics"]
        metrics = ("auc", "balanced_accuracy", "accuracy", "macro_f1", "f1_per_class", "confusion_matrix")
        return {**{k: m[k] for k in metrics}, "n_budget": r["n_budget"], "train_cases": r["train_cases"],
                "val_cases": r["val_cases"], "test_cases": r["test_cases"], "output_folder": r["output_folder"],
                "wall_s": round(time.time() - t0, 1), "log": str(log)}

    def _run(self) -> dict:
        self.prepare()
        results, failures, pre = self.run_steps()
        return write_cls_reports(self.out, results, failures, pre, self.cfg.methods, len(self.train),
                                 len(self.test), self.s)


def _cls_result_files(res_root: Path) -> list[Path]:
    return sorted(res_root.glob("*/*/fold_*/cls_results.json")) if res_root.is_dir() else []


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    if cfg.task not in ("seg", "cls"):
        raise BadInputError(None, f"unknown task '{cfg.task}' (seg, cls)")
    return (ClsBenchmark if cfg.task == "cls" else Benchmark)(cfg).run()


def pretrain_command(pool: str, method: str, device: str, s: dict) -> list[str]:
    """The ``ssl_pretrain`` call of one method under setting ``s`` (a preset with its overrides)."""
    cmd = ["ssl_pretrain", "-d", pool, "-m", method, "-device", device, "--epochs", str(s["pretrain_epochs"]),
           "--iters", str(s["pretrain_iters"]), "--val-iters", "2", "--no-progress", "--preview-every", "0",
           "--save-every", "5"]
    cmd += ["--size", s["size"]] if s["size"] else []
    cmd += ["--batch-size", str(s["pretrain_batch"])] if s["pretrain_batch"] else []
    cmd += ["--lr", str(s["pretrain_lr"])] if s["pretrain_lr"] else []
    cmd += ["--patch-size", *map(str, s["patch_size"])] if s["patch_size"] else []
    return cmd


def refuse_mixed_rerun(out: Path, **now) -> None:
    """A rerun into ``out`` resumes its finished arms, so it must be the same experiment: the setting (preset and
    overrides) and the cases, as ``protocol.json`` recorded them. Arms, methods, label counts and seeds may grow."""
    protocol = out / "protocol.json"
    if not protocol.is_file() or not any((out / "arms").glob("*/result.json")):
        return
    before = read_json(protocol)
    changed = []
    for key, value in now.items():
        old, new = before.get(key) or {}, json.loads(json.dumps(value))  # tuples as the JSON file holds them
        if key == "setting":
            changed += setting_changes(old, new)
        elif (({k: old.get(k) for k in new} if isinstance(new, dict) else old) != new):  # case ids, not paths
            changed.append(f"the {key} cases")
    if changed:
        raise BadInputError(out, f"has finished arms of another experiment ({'; '.join(changed)}); "
                                 "rerun with the same preset and options, or use a new -o")


def _link(dst: Path, src: Path) -> None:
    if not dst.exists():
        dst.symlink_to(Path(src).resolve())


def _pretraining_losses(ckpt: Path) -> dict:
    import torch

    logging_ = torch.load(ckpt, map_location="cpu", weights_only=False)["logging"]
    tr, val = logging_.get("train_losses", []), logging_.get("val_losses", [])
    return {"first_train_loss": float(tr[0]) if tr else None, "final_train_loss": float(tr[-1]) if tr else None,
            "final_val_loss": float(val[-1]) if val else None}


def _jsonable(cfg: BenchmarkConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else {a: str(b) for a, b in v.items()} if isinstance(v, dict)
                and k == "pretrained" else v) for k, v in vars(cfg).items()}
