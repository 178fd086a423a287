"""The structure carries new methods: imports point down only, and a method declared through the registry alone
pretrains and exports; pretraining is reproducible given a seed."""
import ast
from pathlib import Path

import pytest
import torch

import ssl3d
from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.sparse import upsample_mask
from ssl3d.training.methods import method_specs, register_method, unregister_method
from ssl3d.training.methods.heads import DensifyDecoderMethod

PACKAGE = Path(ssl3d.__file__).parent
# floors, lowest first: a module may import its own package or any lower floor, never a higher one
FLOORS = ["utils", "layers", "sparse", "architectures", "data", "planning", "preprocessing", "training", "inference",
          "evaluation", "cli", "nnunet_ext"]


def _floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ssl3d" else None


def _imports(path: Path) -> list[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
    return out


def test_imports_point_down_only():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _floor(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if src is None or src == "__init__":
            continue
        for target in filter(None, map(_floor, _imports(path))):
            if target != src and FLOORS.index(target) > FLOORS.index(src):
                bad.append(f"{path.relative_to(PACKAGE.parent)} ({src}) imports ssl3d.{target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_floor_exists():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    assert set(FLOORS) <= names


def test_registry_specs_are_complete():
    specs = method_specs()
    assert {"spark", "hyspark", "mae"} <= set(specs)
    for name, spec in specs.items():
        assert spec.trainer_name.endswith("Pretrainer") and spec.description
        assert spec.downstream is not None, f"{name}: no downstream network"
        assert spec.optim.peak_lr(2) > 0
    assert specs["hyspark"].optim.peak_lr(8) == 1e-4 and specs["hyspark"].optim.betas == (0.9, 0.999)
    assert specs["hyspark"].optim.grad_clip == 5.0


class DenseMaskedCNN(DensifyDecoderMethod):
    """Throw-away method: the planned ResEnc run densely on the zero-filled masked input."""

    name = "throwaway"

    def __init__(self, architecture: dict, in_channels: int, patch_size, cell_size):
        super().__init__(patch_size, cell_size)
        self.architecture = architecture
        self.encoder = build_network_from_plans(architecture, in_channels, 1).encoder
        kw = architecture["arch_kwargs"]
        self.build_head(list(kw["features_per_stage"]), kw["strides"], in_channels, 0.5, "add")

    def encode(self, x, visible):
        return self.encoder(x if visible is None else x * upsample_mask(visible, x.shape[2:])[:, None])

    def downstream_architecture(self) -> dict:
        return self.architecture


@pytest.fixture
def throwaway_method():
    from ssl3d.architectures.from_plans import scaled_architecture

    @register_method("throwaway", "test-only dense masked CNN", trainer_name="ThrowawayPretrainer",
                     downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                     tiny={"size": "tiny"})
    def build(plans, configuration, num_input_channels, size="planned"):
        return DenseMaskedCNN(scaled_architecture(configuration["architecture"], size), num_input_channels,
                              configuration["patch_size"], configuration["ssl3d"]["mask_cell_size"])

    yield "throwaway"
    unregister_method("throwaway")


def _pool_env(monkeypatch, pool, results):
    monkeypatch.setenv("nnUNet_preprocessed", str(pool.dataset_dir.parent))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_raw", str(results / "raw"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


def _trainer(pool, method, *extra):
    from ssl3d.cli.pretrain import build_parser, make_trainer

    args = build_parser().parse_args(["-d", pool.dataset_dir.name, "-m", method, "-device", "cpu", "--batch-size",
                                      "2", "--val-iters", "1", "--no-progress", "--preview-every", "0", *extra])
    return make_trainer(args)


def test_a_method_declared_through_the_registry_alone_pretrains_and_exports(throwaway_method, tiny_pool, tmp_path,
                                                                           monkeypatch):
    from ssl3d.training.export import export_weights

    _pool_env(monkeypatch, tiny_pool, tmp_path)
    trainer = _trainer(tiny_pool, throwaway_method, "--epochs", "1", "--iters", "1", "--size", "tiny")
    assert type(trainer).__name__ == "ThrowawayPretrainer"
    trainer.run_training()
    folder = tmp_path / tiny_pool.dataset_dir.name / "ThrowawayPretrainer__ssl3dPlans__3d_fullres"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    res = export_weights(folder, tmp_path / "w.pth", num_classes=3)
    assert res["method"] == "throwaway" and res["encoder_tensors"] > 10
    saved = torch.load(tmp_path / "w.pth", weights_only=False)["network_weights"]
    trained = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    key = next(k for k in trained if k.startswith("encoder.") and k.endswith("weight"))
    assert torch.equal(saved[key], trained[key])


def _losses(pool, results, monkeypatch, seed):
    _pool_env(monkeypatch, pool, results)
    trainer = _trainer(pool, "mae", "--epochs", "2", "--iters", "10", "--size", "tiny", "--seed", str(seed),
                       "--save-every", "100")
    trainer.run_training()
    return [float(v) for v in trainer.logger.get_checkpoint()["train_losses"]]


def test_pretraining_is_reproducible_given_a_seed(tiny_pool, tmp_path, monkeypatch):
    a = _losses(tiny_pool, tmp_path / "a", monkeypatch, 7)
    b = _losses(tiny_pool, tmp_path / "b", monkeypatch, 7)
    c = _losses(tiny_pool, tmp_path / "c", monkeypatch, 8)
    assert a == b, (a, b)
    assert a != c


@pytest.mark.parametrize("method", sorted(n for n, s in method_specs().items() if s.sparse))
def test_densify_visible_features_do_not_depend_on_mask_token_or_ratio(method):
    """SparK's order: visible-only normalization, then mask tokens. Changing the tokens or masking more cells
    elsewhere must not change what densify makes of a visible position before projection."""
    from test_pretraining import tiny_method

    m = tiny_method(method).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    g = torch.Generator().manual_seed(0)
    vis = m.random_mask(2, 0.5, g)
    captured = []
    hooks = [p.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].clone())) for p in m.densify.proj]
    with torch.no_grad():
        feats = m.encode(x, vis)
        m.densify(feats, vis)
        for t in m.densify.mask_tokens:
            t.add_(5.0)
        m.densify(feats, vis)
    for h in hooks:
        h.remove()
    n = len(m.densify.proj)
    for s in range(n):
        keep = upsample_mask(vis, captured[s].shape[2:])[:, None]
        assert torch.equal(captured[s] * keep, captured[n + s] * keep), "visible features depend on the token"
        assert not torch.equal(captured[s], captured[n + s])
        # visible statistics: every visible channel map is normalized to zero mean over visible voxels
        norm = m.densify.norms[s]
        mean = ((captured[s] - norm.bias.view(1, -1, 1, 1, 1)) * keep).sum((2, 3, 4)) / keep.sum((2, 3, 4))
        assert mean.abs().max() < 1e-3


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    assert not long, long


def test_no_copy_of_the_seed_literal():
    hits = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
            if "12345" in p.read_text(encoding="utf-8") and p.name != "utils.py"]
    assert not hits, f"use ssl3d.utils.DEFAULT_SEED: {hits}"
