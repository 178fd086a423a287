"""Checks behind docs/classification_investigation.md: why fatty-liver classification sits at chance.

Needs a preprocessed classification dataset (``ssl_finetune_cls`` or ``ssl3d.evaluation.classification.prepare``
writes it) and a pretraining results folder for the downstream architecture:

    python benchmarks/cls_investigation.py --dataset 804 --pretraining <results folder> [--train-iters 200]

Prints one JSON line per check: labels vs shifts, intensity-histogram probe, instance-norm invariance, frozen
random-encoder probe, the same with each case whole in one tile (padding 0 or the case minimum; deepest or all
stages pooled), best-of-epochs validation AUC on 3 + 3 chance cases, and (``--train-iters`` > 0) a minimal
training loop with the trainer's model, crops, mirroring and whole-case sliding-window scoring (``--crop Z Y X``:
another crop / tile shape, e.g. one that holds the whole tiny volume; ``--finetune``: from the pretrained encoder).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl3d.architectures.encoders import avg_max_pool
from ssl3d.data.readers import find_raw_dataset
from ssl3d.evaluation.classification import load_preprocessed
from ssl3d.training.external import for_downstream, load_pretrained
from ssl3d.training.finetuning.classification import (build_classifier, centred_padding, resolve_crop,
                                                      sliding_window_logits)
from ssl3d.utils import env_dir


def _probe(x_train: np.ndarray, y_train: list, x_test: np.ndarray, y_test: list) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(x_train, y_train)
    return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--pretraining", required=True)
    ap.add_argument("--train-iters", type=int, default=0)
    ap.add_argument("--crop", type=int, nargs=3, metavar=("Z", "Y", "X"),
                    help="training crop and scoring tile of the minimal loop (default: the planned patch)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak LR of the minimal loop's one-cycle schedule")
    ap.add_argument("--finetune", action="store_true", help="minimal loop from the pretrained encoder")
    a = ap.parse_args()
    torch.set_num_threads(1)
    raw = find_raw_dataset(a.dataset)
    dj = json.loads((raw / "dataset.json").read_text())
    lab, shift = dj["ssl3d_case_labels"], dj["ssl3d_liver_hu_shift"]
    data_dir = next((env_dir("nnUNet_preprocessed") / raw.name).glob("ssl3d_*ClsPlans_3d_fullres"))
    arch = json.loads((Path(a.pretraining) / "ssl_method.json").read_text())["downstream_architecture"]
    patch = tuple(json.loads(next(data_dir.parent.glob("ssl3d_*ClsPlans.json")).read_text())
                  ["configurations"]["3d_fullres"]["patch_size"])
    keys = sorted(lab)
    pos, neg = [k for k in keys if lab[k]], [k for k in keys if not lab[k]]
    half = 2 * min(len(pos), len(neg)) // 5  # 40 cases: 16 held out, 24 to fit
    test, train = pos[:half] + neg[:half], pos[half:] + neg[half:]
    y = {k: lab[k] for k in keys}
    imgs = {k: load_preprocessed(data_dir, k) for k in keys}
    out = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731

    out(check="labels vs liver shift", agree=all((shift[k] != 0) == bool(lab[k]) for k in keys), cases=len(keys))
    bins = np.linspace(-1.1, 1.0, 22)
    for name, sel in (("all voxels", lambda x: x > -np.inf), ("body voxels", lambda x: x > -0.95)):
        h = {k: np.histogram(imgs[k][0][sel(imgs[k][0])], bins)[0] / sel(imgs[k][0]).sum() for k in keys}
        out(check=f"histogram probe ({name})", held_out_auc=_probe([h[k] for k in train], [y[k] for k in train],
                                                                   [h[k] for k in test], [y[k] for k in test]))
    torch.manual_seed(0)
    net = build_classifier(arch, 1, 2, patch).eval()
    x = torch.as_tensor(imgs[keys[0]])[None]
    pad = [v for s, p in zip(reversed(x.shape[2:]), reversed(patch)) for v in (0, max(0, p - s))]
    x = torch.nn.functional.pad(x, pad)
    x = x[:, :, :patch[0], :patch[1], :patch[2]]
    with torch.no_grad():
        e0, e1 = net.embed(x), net.embed(x + 0.5)
    out(check="embedding change for a +0.5 shift of the whole patch", relative=float((e1 - e0).norm() / e0.norm()))
    emb = {k: sliding_window_logits(net.embed, imgs[k], patch, torch.device("cpu")).numpy() for k in keys}
    out(check="frozen random encoder probe", held_out_auc=_probe([emb[k] for k in train], [y[k] for k in train],
                                                                 [emb[k] for k in test], [y[k] for k in test]))
    whole = resolve_crop("case", None, arch, patch, [imgs[k].shape[1:] for k in keys])  # holds every case
    _padding_and_stage_probes(arch, imgs, y, train, test, whole, out)
    s = np.random.default_rng(0).random((20000, 20, 6))
    best = (s[..., 3:, None] > s[..., None, :3]).mean((-1, -2)).max(1)
    out(check="best of 20 epochs, chance network, 3 + 3 validation cases", median_auc=float(np.median(best)),
        share_ge_0_78=float((best >= 0.777).mean()), share_1=float((best == 1).mean()))
    if a.train_iters:
        state = for_downstream(load_pretrained(a.pretraining, "0"), 1).encoder_state if a.finetune else None
        _train(arch, tuple(a.crop or patch), imgs, y, train, test, a.train_iters, out, state, a.lr)


def _padding_and_stage_probes(arch: dict, imgs: dict, y: dict, train: list, test: list, crop: tuple, out) -> None:
    """Frozen random encoders (2 seeds), each case centred whole in one ``crop`` tile (the ``--crop case`` tile):
    logistic regression on the deepest stage's average ‖ maximum against all stages' ones, with the tile padded by 0
    (nnU-Net's loader; 0 is the dataset mean, soft-tissue-like in CT) or by the value air and fat are clipped to
    (the case minimum)."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_classifier(arch, 1, 2, crop).eval()
        for pad in ("zero", "case minimum"):
            feats = {}
            for k in train + test:
                x = torch.as_tensor(imgs[k])
                value = 0.0 if pad == "zero" else float(x.min())
                widths = [v for pair in reversed(centred_padding(x.shape[1:], crop)) for v in pair]
                x = torch.nn.functional.pad(x, widths, value=value)
                with torch.no_grad():
                    feats[k] = [avg_max_pool(f)[0].numpy() for f in net.backbone(x[None])]
            for stages, pick in (("deepest", lambda f: f[-1]), ("all", np.concatenate)):
                out(check="frozen random encoder probe, whole case in one tile", seed=seed, padding=pad,
                    stages=stages, held_out_auc=_probe([pick(feats[k]) for k in train], [y[k] for k in train],
                                                       [pick(feats[k]) for k in test], [y[k] for k in test]))


def _train(arch: dict, patch: tuple, imgs: dict, y: dict, train: list, test: list, iters: int, out,
           encoder_state: dict | None = None, lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_classifier(arch, 1, 2, patch, encoder_state)
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)

    def crop(x: np.ndarray) -> np.ndarray:
        # centred like nnU-Net's loader and sliding_window_logits (before 2026-12-01 both padded at the far end)
        x = np.pad(x, [(0, 0)] + centred_padding(x.shape[1:], patch))
        st = [rng.integers(0, s - p + 1) for s, p in zip(x.shape[1:], patch)]
        c = x[:, st[0]:st[0] + patch[0], st[1]:st[1] + patch[1], st[2]:st[2] + patch[2]]
        for ax in range(1, 4):
            if rng.random() < 0.5:
                c = np.flip(c, ax)
        return np.ascontiguousarray(c)

    t, losses = time.time(), []
    for _ in range(iters):
        ks = [train[i] for i in rng.integers(0, len(train), 2)]
        loss = torch.nn.functional.cross_entropy(net(torch.as_tensor(np.stack([crop(imgs[k]) for k in ks]))),
                                                 torch.tensor([y[k] for k in ks]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()

    def auc(ks: list) -> float:
        p = [torch.softmax(sliding_window_logits(net, imgs[k], patch, torch.device("cpu")), 0)[1].item() for k in ks]
        return float(roc_auc_score([y[k] for k in ks], p))

    out(check="minimal training loop", iters=iters, crop=list(patch), lr=lr, finetune=encoder_state is not None,
        train_loss_last50=float(np.mean(losses[-50:])), train_case_auc=auc(train[::3]), held_out_auc=auc(test),
        seconds=round(time.time() - t))


if __name__ == "__main__":
    main()
