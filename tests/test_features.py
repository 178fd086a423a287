"""Feature extraction: CLI outputs, stitching, determinism, resume, bad input, the in-process API (MAE)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ct_volume, subprocess_env, write_image
from ssl3d.cli.extract_features import main
from ssl3d.inference.features import (Encoder, discover_images, embed_image, encoder_stage_features,
                                      extract_features)
from ssl3d.training.methods import build_method
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def spark_results(tiny_pool, tmp_path_factory):
    """One tiny SparK pretraining on the shared pool (patch 16x32x32 at 2x1x1 mm)."""
    res = tmp_path_factory.mktemp("feat_results")
    env = subprocess_env(res / "raw", tiny_pool.dataset_dir.parent, res)
    r = subprocess.run([str(BIN / "ssl_pretrain"), "-d", tiny_pool.dataset_dir.name, "-m", "spark", "-device", "cpu",
                        "--size", "tiny", "--epochs", "1", "--iters", "2", "--val-iters", "1", "--batch-size", "2",
                        "--no-progress", "--preview-every", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return res / tiny_pool.dataset_dir.name / "SparKPretrainer__ssl3dPlans__3d_fullres"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two plain images: one larger than a patch after resampling (several windows), one smaller (padded)."""
    d = tmp_path_factory.mktemp("feat_images")
    write_image(d / "big.nii.gz", ct_volume(21, (20, 48, 44)), spacing=(0.8, 0.8, 2.0))
    write_image(d / "small.nrrd", ct_volume(22, (10, 24, 24)), spacing=(1.0, 1.0, 2.0))
    return d


def _cli(*args):
    return subprocess.run([str(BIN / "ssl_extract_features"), *map(str, args), "-device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def cli_out(spark_results, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("feat_out") / "feats"
    r = _cli("-p", spark_results, "-i", images, "-o", out, "--stages")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_cli_writes_embeddings_and_stages(cli_out, spark_results):
    features = json.loads((spark_results / "ssl_method.json").read_text())["features_per_stage"]
    meta = json.loads((cli_out / "features.json").read_text())
    assert meta["method"] == "spark" and meta["stage_channels"] == features and meta["patch_size"] == [16, 32, 32]
    assert meta["spacing"] == [2.0, 1.0, 1.0] and Path(meta["checkpoint"]).is_file()
    assert sorted(p.name for p in cli_out.iterdir()) == ["big.npz", "embeddings.npz", "features.json", "small.npz"]
    embs = {}
    for case in ("big", "small"):
        with np.load(cli_out / f"{case}.npz") as f:
            emb = f["embedding"]
            assert emb.dtype == np.float32 and emb.shape == (features[-1],) and np.isfinite(emb).all()
            assert f["embedding_max"].shape == emb.shape and (f["embedding_max"] >= emb - 1e-6).all()
            shape = tuple(f["preprocessed_shape"])
            for i, (c, stride) in enumerate(zip(features, meta["stage_strides"])):
                st = f[f"stage_{i}"]
                assert st.shape == (c, *(-(-s // r) for s, r in zip(shape, stride))) and np.isfinite(st).all()
            embs[case] = emb
    assert shape == (10, 24, 24)  # the small image is padded up to the 16x32x32 patch, not resampled to it
    assert not np.allclose(embs["big"], embs["small"]), "different images must give different embeddings"
    with np.load(cli_out / "embeddings.npz") as f:
        assert list(f["case_ids"]) == ["big", "small"]
        np.testing.assert_array_equal(f["embeddings"], np.stack([embs["big"], embs["small"]]))


def test_deterministic_and_resumable(cli_out, spark_results, images, tmp_path):
    a = extract_features(spark_results, images, tmp_path / "a", progress=False)
    b = extract_features(spark_results, images, tmp_path / "b", progress=False)
    assert a["done"] == b["done"] == ["big", "small"] and a["embedding_dim"] == b["embedding_dim"]
    for case in ("big", "small"):
        ea, eb = (np.load(tmp_path / d / f"{case}.npz")["embedding"] for d in "ab")
        np.testing.assert_array_equal(ea, eb)
        assert "stage_0" not in np.load(tmp_path / "a" / f"{case}.npz").files
        # the CLI run (another process, with --stages) gives the same embedding up to float summation order
        np.testing.assert_allclose(ea, np.load(cli_out / f"{case}.npz")["embedding"], rtol=1e-4, atol=1e-5)
    # rerun: finished cases are skipped, their files untouched
    before = {p.name: p.stat().st_mtime_ns for p in cli_out.glob("*.npz") if p.name != "embeddings.npz"}
    assert main(["-p", str(spark_results), "-i", str(images), "-o", str(cli_out), "-device", "cpu",
                 "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cli_out.glob("*.npz") if p.name != "embeddings.npz"} == before
    # asking for stages where none were saved recomputes; --overwrite recomputes everything
    assert extract_features(spark_results, images, tmp_path / "a", stages=True, progress=False)["done"] == ["big",
                                                                                                          "small"]
    assert extract_features(spark_results, images, tmp_path / "a", progress=False)["skipped"] == ["big", "small"]
    assert extract_features(spark_results, images, tmp_path / "a", overwrite=True, progress=False)["done"] == [
        "big", "small"]


@pytest.mark.parametrize("case", ["missing_results", "empty_inputs"])
def test_bad_input_one_line_exit_2(case, spark_results, tmp_path):
    (tmp_path / "empty").mkdir()
    results, inputs = (tmp_path / "nope", tmp_path / "empty") if case == "missing_results" else \
        (spark_results, tmp_path / "empty")
    r = _cli("-p", results, "-i", inputs, "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(results if case == "missing_results" else inputs) in lines[0]
    assert not (tmp_path / "out").exists()


def test_unreadable_image_names_the_file_and_writes_nothing_for_it(spark_results, tmp_path, capsys):
    write_image(tmp_path / "in" / "a_good.nii.gz", ct_volume(3, (12, 32, 32)), spacing=(1.0, 1.0, 2.0))
    (tmp_path / "in" / "b_bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rc = main(["-p", str(spark_results), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-device", "cpu",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "b_bad.nii.gz" in err[0], err
    # the good case before it is complete (resumable); nothing half-written, no summary of a failed run
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.npz"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_unavailable_is_one_line(spark_results, images, tmp_path, capsys):
    assert main(["-p", str(spark_results), "-i", str(images), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_nnunet_naming_groups_channels(tmp_path):
    for cid in ("x", "y"):
        for ch in range(2):
            write_image(tmp_path / f"{cid}_{ch:04d}.nii.gz", ct_volume(ch, (4, 8, 8)))
    cases = discover_images(tmp_path, 2)
    assert [(c.case_id, [Path(f[0]).name for f in c.channel_files]) for c in cases] == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"]), ("y", ["y_0000.nii.gz", "y_0001.nii.gz"])]
    (tmp_path / "y_0001.nii.gz").unlink()
    with pytest.raises(BadInputError, match="y_0001.nii.gz: missing channel"):
        discover_images(tmp_path, 2)


class _Pools(torch.nn.Module):
    """Translation-equivariant stand-in encoder: stitched windows must equal the whole-image maps exactly."""

    patch_size = (8, 8, 8)

    def encode(self, x, visible):
        return [F.avg_pool3d(x, (1, 2, 2)), F.avg_pool3d(x, 4)]


def test_sliding_window_stitches_exactly():
    shape = (13, 20, 9)
    image = torch.randn(1, *shape)
    enc = Encoder(_Pools(), {}, {"name": "pools"}, Path("."), Path("x"), (8, 8, 8), 1, torch.device("cpu"),
                  [1, 1], [(1, 2, 2), (4, 4, 4)])
    res = embed_image(enc, image.numpy(), stages=True)
    padded = F.pad(image, (0, 3, 0, 0, 0, 3))  # up to multiples of 4 (and at least one patch)
    for got, pool in zip(res["stages"], [(1, 2, 2), (4, 4, 4)]):
        want = F.avg_pool3d(padded[None], pool)[0]
        want = want[:, :-(-13 // pool[0]), :-(-20 // pool[1]), :-(-9 // pool[2])]
        torch.testing.assert_close(torch.from_numpy(got), want)
    # embedding = mean of the deepest cells over the image, each weighted by the fraction of it that is image
    deep = F.avg_pool3d(padded[None], 4)[0]
    weight = F.avg_pool3d(F.pad(torch.ones(1, 1, *shape), (0, 3, 0, 0, 0, 3)), 4)[0]
    assert weight.min() < 1 and weight.max() == 1
    torch.testing.assert_close(torch.from_numpy(res["embedding"]), (deep * weight).sum((1, 2, 3)) / weight.sum())
    torch.testing.assert_close(torch.from_numpy(res["embedding_max"]), deep.amax((1, 2, 3)))


def test_mae_stage_features_in_process():
    torch.manual_seed(0)
    cfg = {"patch_size": [16, 32, 32], "ssl3d": {"mae_patch_size": [4, 8, 8]}}
    m = build_method("mae", {}, cfg, 1, size="tiny").eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.inference_mode():
        feats = encoder_stage_features(m, x)
        assert len(feats) == 1 and feats[0].shape == (2, 48, 4, 4, 4) and torch.isfinite(feats[0]).all()
        # the token path with every patch visible, folded onto its grid, is the same map
        all_visible = torch.ones(2, 4, 4, 4, dtype=torch.bool)
        tokens_method = type("Tokens", (), {"encode": lambda self, x, v: m.encode(x, all_visible)})()
        torch.testing.assert_close(encoder_stage_features(tokens_method, x)[0], feats[0], rtol=1e-4, atol=1e-5)
