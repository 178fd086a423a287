"""End to end on tiny synthetic demo data: make data -> ssl_plan_and_preprocess -> nnU-Net can read the result."""
import json

import numpy as np

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from ssl3d.cli.make_demo_data import main as make_demo_data
from ssl3d.cli.plan_and_preprocess import main as plan_and_preprocess


def test_demo_data_to_preprocessed_pool(nnunet_env, capsys):
    raw = nnunet_env["nnUNet_raw"]
    assert make_demo_data(["-o", str(raw), "--seed", "3", "--n-unlabeled", "5", "--n-labeled", "2",
                           "--size", "tiny"]) == 0
    # pool = unlabeled set + the labeled set's images (labels ignored), merged
    rc = plan_and_preprocess(["-d", "801", "802", "-np", "2", "--verify", "--no-progress", "-od", "950"])
    err = capsys.readouterr().err
    assert rc == 0, err
    pool = nnunet_env["nnUNet_preprocessed"] / "Dataset950_SSLPool"
    plans = json.loads((pool / "ssl3dPlans.json").read_text())
    manifest = json.loads((pool / "manifest.json").read_text())
    fingerprint = json.loads((pool / "dataset_fingerprint.json").read_text())
    assert len(manifest["cases"]) == 7
    assert {c["origin"] for c in manifest["cases"]} == {"Dataset801_SynthCTPool", "Dataset802_SynthCTOrgans"}
    assert fingerprint["modalities"] == {"0": "CT"}
    fg = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert -300 < fg["percentile_00_5"] < 0 < fg["mean"] < 200 < fg["percentile_99_5"]

    # slice spacing of the synthetic data is coarser than in-plane: the plans must pool in-plane first
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["transpose_forward"][0] == 0 and cfg["spacing"][0] > cfg["spacing"][1]

    # nnU-Net's own classes read what we wrote
    cm = PlansManager(plans).get_configuration("3d_fullres")
    ds = nnUNetDatasetBlosc2(str(pool / cm.data_identifier))
    assert len(ds.identifiers) == 7
    data, seg, _, props = ds.load_case(ds.identifiers[0])
    assert data.shape[0] == 1 and data.shape[1:] == seg.shape[1:] == tuple(props["shape_after_resampling"])
    patch = np.asarray(data[0, :8, :16, :16])
    assert np.isfinite(patch).all() and 1 in props["class_locations"]
    assert "Dataset950_SSLPool" in err
