import glob
import os

# Triton reads TRITON_INTERPRET when it is imported (by any test, nnU-Net or torch), so the interpreter that
# runs the Triton kernel tests on CPU must be switched on before anything else, and only without a GPU (with
# one, the compiled kernels are tested; "auto" never picks Triton for CPU tensors).
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def write_image(path, array, spacing=(0.8, 0.8, 4.0), direction=None, origin=(0.0, 0.0, 0.0)):
    """Write a numpy (z, y, x) array with SimpleITK; spacing in SimpleITK (x, y, z) order."""
    img = sitk.GetImageFromArray(array, isVector=False)
    if array.ndim == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return Path(path)


def ct_volume(seed=0, shape=(16, 40, 36)):
    """A small CT-like volume: air, an elliptic body of soft tissue, a brighter 'organ', noise."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    a = np.full(shape, -1000.0, np.float32)
    zz, yy, xx = np.mgrid[:z, :y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.4 * x)) ** 2 < 1
    a[body] = -90.0
    a[body & (((yy - y / 2) / (0.3 * y)) ** 2 + ((xx - x / 2) / (0.3 * x)) ** 2 < 1)] = 45.0
    a[body & (((yy - y * 0.45) / 5) ** 2 + ((xx - x * 0.4) / 4) ** 2 < 1)] = 60.0
    a += rng.normal(0, 12, shape).astype(np.float32)
    return a.astype(np.int16)


def make_raw_dataset(root, dataset_id=801, name="Test", n=3, n_channels=1, spacing=(0.8, 0.8, 4.0),
                     shape=(16, 40, 36), labels=False):
    folder = Path(root) / f"Dataset{dataset_id:03d}_{name}"
    for i in range(n):
        for c in range(n_channels):
            write_image(folder / "imagesTr" / f"case{i:03d}_{c:04d}.nii.gz", ct_volume(i * 10 + c, shape), spacing)
        if labels:
            lab = (ct_volume(i, shape) > 20).astype(np.uint8)
            write_image(folder / "labelsTr" / f"case{i:03d}.nii.gz", lab, spacing)
    channel_names = {str(c): "CT" for c in range(n_channels)}
    dj = {"channel_names": channel_names, "labels": {"background": 0, "tissue": 1} if labels else {"background": 0},
          "numTraining": n, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def subprocess_env(raw, preprocessed, results, n_proc_da: str = "0") -> dict:
    """The environment for ssl3d / nnU-Net commands run as subprocesses: these nnU-Net folders, a fixed number of
    augmentation workers and one thread per process (tests share 2 cores)."""
    return dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results),
                nnUNet_n_proc_DA=n_proc_da, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def _one_thread_per_xdist_worker():
    """Under `make test` two xdist workers share the 2 cores: one intra-op thread each (test modules that ask for 2
    at import would otherwise run 4 threads on 2 cores, and OpenMP slows down badly when oversubscribed)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Isolated nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders."""
    paths = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in paths.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return paths


def blob_batch(seed, batch=2, shape=(16, 32, 32)):
    """Smooth volumes (sums of Gaussian blobs): masked regions are predictable from their context."""
    import torch

    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(float(s)) for s in shape], indexing="ij")
    out = []
    for _ in range(batch):
        v = torch.zeros(shape)
        for _ in range(6):
            c = torch.rand(3, generator=g) * torch.tensor([float(s) for s in shape])
            s = 3 + 5 * torch.rand(1, generator=g)
            v += torch.exp(-sum((gr - ci) ** 2 for gr, ci in zip(grids, c)) / (2 * s ** 2))
        out.append(v)
    return torch.stack(out)[:, None]


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A preprocessed pool of 6 small CT-like cases, shared by the pretraining tests (read-only)."""
    from ssl3d.preprocessing.pipeline import PlanOptions, plan_and_preprocess

    root = tmp_path_factory.mktemp("pool")
    for i in range(6):
        write_image(root / "scans" / f"c{i}.nii.gz", ct_volume(i, (20, 48, 44)), spacing=(0.8, 0.8, 2.0))
    res = plan_and_preprocess(PlanOptions(folders=[str(root / "scans")], output_root=str(root / "pre"),
                                          num_processes=1, progress=False, patch_size=(16, 32, 32),
                                          spacing=(2.0, 1.0, 1.0)))
    return res


@pytest.fixture(scope="session")
def tiny_pretraining(tiny_pool, tmp_path_factory):
    """One tiny SparK pretraining (1 epoch, 1 iteration) on the shared pool: a results folder commands transfer from."""
    import subprocess
    import sys

    res = tmp_path_factory.mktemp("ptres")
    env = subprocess_env(res / "raw", tiny_pool.dataset_dir.parent, res)
    r = subprocess.run([str(Path(sys.executable).parent / "ssl_pretrain"), "-d", tiny_pool.dataset_dir.name, "-m",
                        "spark", "-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters", "1", "--val-iters",
                        "1", "--batch-size", "2", "--no-progress", "--preview-every", "0"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return res / tiny_pool.dataset_dir.name / "SparKPretrainer__ssl3dPlans__3d_fullres"
