"""nnssl (MIC-DKFZ/nnssl, the OpenMind checkpoints) in and out.

An nnssl checkpoint is a torch dict with ``network_weights`` (the whole pretraining network's state_dict) and
``nnssl_adaptation_plan`` (``AdaptationPlan.serialize()``): ``architecture_plans`` (``arch_class_name``:
ResEncL, PrimusS/B/M/L, ResidualEncoderUNet with ``arch_kwargs``), ``pretrain_plan`` (an nnssl ``Plan``: one
configuration named by its spacing style with spacing, normalization, patch size), ``pretrain_num_input_channels``,
``recommended_downstream_patchsize``, ``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj`` and
``key_to_lpe``. nnssl's fine-tuning loads the encoder and the stem only (decoder from scratch), repeats the input
projection over the channels (divided by their count) and interpolates the learned positional embedding
trilinearly when the patch differs; :func:`ssl3d.training.external.for_downstream` does both here.
See docs/external_checkpoints.md.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ssl3d.training.external.source import PretrainedSource, register_format
from ssl3d.utils import BadInputError

logger = logging.getLogger(__name__)

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# downstream (dna) key paths: ResidualEncoderUNet / Primus set these attributes in __init__
DOWNSTREAM_KEYS = {"ResidualEncoderUNet": ("encoder.stages", "encoder.stem"), "Primus": ("eva", "down_projection")}
# nnssl's normalization names -> nnU-Net's classes of the same map
NORMALIZATION = {"ZScoreNormalization": "ZScoreNormalization", "NoNormalization": "NoNormalization",
                 "RescaleTo01": "RescaleTo01Normalization", "RGBTo01": "RGBTo01Normalization",
                 "RescaleTo01Normalization": "RescaleTo01Normalization", "RGBTo01Normalization": "RGBTo01Normalization",
                 "CTNormalization": "CTNormalization"}
PLAN_FIELDS = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
               "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj")


def resenc_l_kwargs() -> dict:
    """nnssl's ``get_res_enc_l`` (architecture_registry.py), as plans ``arch_kwargs``."""
    return {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
            "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}


def sniff(path: Path, obj: dict) -> bool:
    return isinstance(obj.get("network_weights"), dict) and isinstance(obj.get("nnssl_adaptation_plan"), dict)


def _strip(state: dict) -> dict[str, torch.Tensor]:
    """DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed (nnssl saves without them)."""
    out = {}
    for k, v in state.items():
        for pre in ("module.", "_orig_mod."):
            k = k[len(pre):] if k.startswith(pre) else k
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _pretrain_config(path: Path, plan: dict) -> tuple[str, dict]:
    configs = (plan.get("configurations") or {}) if isinstance(plan, dict) else {}
    if not configs or not all(isinstance(c, dict) for c in configs.values()):
        raise BadInputError(path, "nnssl_adaptation_plan.pretrain_plan has no configurations")
    name = "3d_fullres" if "3d_fullres" in configs else next(iter(configs))
    return name, configs[name]


def _architecture(path: Path, arch_plans: dict, weights: dict, patch: list[int]) -> tuple[dict, str]:
    """(downstream plans architecture, dna class key of DOWNSTREAM_KEYS) for the adaptation plan's network."""
    name = arch_plans.get("arch_class_name")
    if name == "ResEncL":
        return {"network_class_name": RESENC_CLASS, "arch_kwargs": resenc_l_kwargs(),
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}, "ResidualEncoderUNet"
    if name == "ResidualEncoderUNet":
        kw = dict(arch_plans.get("arch_kwargs") or {})
        if not kw:
            raise BadInputError(path, "architecture ResidualEncoderUNet without arch_kwargs in the adaptation plan")
        req = [k for k in (arch_plans.get("arch_kwargs_requiring_import") or ["conv_op", "norm_op", "nonlin"])
               if k in kw]
        if "dropout_op" in kw and "dropout_op" not in req:
            req.append("dropout_op")
        return {"network_class_name": RESENC_CLASS, "arch_kwargs": kw, "_kw_requires_import": req}, \
            "ResidualEncoderUNet"
    if name in ("PrimusS", "PrimusB", "PrimusM", "PrimusL"):
        return _primus_architecture(path, name[-1], weights, patch), "Primus"
    raise BadInputError(path, f"nnssl architecture '{name}' is not supported (ResEncL, ResidualEncoderUNet, "
                              "PrimusS, PrimusB, PrimusM, PrimusL)")


def _primus_architecture(path: Path, size: str, weights: dict, patch: list[int]) -> dict:
    """dna's Primus<size> (nnssl builds its downstream with patch_embed_size 8³); layer scale and the inner
    attention norm as the pretrained blocks carry them (nnssl's EvaMAE sets both)."""
    from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS

    from ssl3d.architectures.primus import primus_architecture

    conf = _PRIMUS_CONFIGS[size]
    proj = weights.get("down_projection.proj.weight")
    if proj is None:
        raise BadInputError(path, "Primus checkpoint without down_projection.proj.weight")
    embed = [int(s) for s in proj.shape[2:]]
    depth = 1 + max((int(k.split(".")[2]) for k in weights if k.startswith("eva.blocks.")), default=-1)
    if int(proj.shape[0]) != conf["embed_dim"] or depth != conf["eva_depth"]:
        raise BadInputError(path, f"weights (embed dim {int(proj.shape[0])}, {depth} EVA blocks) are not Primus"
                                  f"{size} (embed dim {conf['embed_dim']}, {conf['eva_depth']} blocks)")
    extra = {"init_values": 0.1 if "eva.blocks.0.gamma_1" in weights else None,
             "scale_attn_inner": "eva.blocks.0.attn.norm.weight" in weights}
    try:
        return primus_architecture(conf["embed_dim"], conf["eva_depth"], conf["eva_numheads"], embed, patch, **extra)
    except ValueError as e:
        raise BadInputError(path, str(e)) from None


def load_nnssl(path: Path, obj: dict) -> PretrainedSource:
    ap = obj["nnssl_adaptation_plan"]
    missing = [f for f in PLAN_FIELDS if f not in ap]
    if missing:
        raise BadInputError(path, f"nnssl_adaptation_plan lacks {', '.join(missing)}")
    weights = _strip(obj["network_weights"])
    cfg_name, pcfg = _pretrain_config(path, ap["pretrain_plan"])
    n_in = int(ap["pretrain_num_input_channels"])
    pre_patch = [int(p) for p in (pcfg.get("patch_size") or ap["recommended_downstream_patchsize"])]
    arch_name = ap["architecture_plans"].get("arch_class_name", "?")
    arch, dna = _architecture(path, ap["architecture_plans"], weights, pre_patch)
    enc_to, stem_to = DOWNSTREAM_KEYS[dna]
    enc_from, stem_from = ap["key_to_encoder"], ap["key_to_stem"]

    def moved(k: str) -> str | None:
        for src, dst in ((stem_from, stem_to), (enc_from, enc_to)):  # stem first: it may sit inside the encoder
            if k == src or k.startswith(src + "."):
                return dst + k[len(src):]
        return None

    state = {m: v for k, v in weights.items() if (m := moved(k)) is not None}
    if not state:
        raise BadInputError(path, f"no weights under key_to_encoder '{enc_from}' or key_to_stem '{stem_from}' "
                                  f"(zero tensors; keys start with {sorted({k.split('.')[0] for k in weights})[:5]})")
    in_proj = [m for k in ap["keys_to_in_proj"] if (m := moved(f"{k}.weight")) in state]
    plans = obj.get("ssl3d_plans") or _plans_from_nnssl(path, ap["pretrain_plan"], cfg_name, pcfg, n_in, arch)
    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_fullres"]["architecture"] = arch
    info = {"name": f"nnssl_{arch_name}", "format": "nnssl", "trainer_name": obj.get("trainer_name"),
            "nnssl_adaptation_plan": ap, "in_proj_keys": in_proj,
            "pos_embed_key": "eva.pos_embed" if ap.get("key_to_lpe") and dna == "Primus" else None,
            "pretrain_patch_size": pre_patch,
            "recommended_patch_size": [int(p) for p in ap["recommended_downstream_patchsize"]]}
    if obj.get("ssl3d"):
        info["ssl3d"] = obj["ssl3d"]
    return PretrainedSource("nnssl", path, f"nnssl_{arch_name}", plans, arch, tuple(pre_patch), n_in, state, None,
                            info)


def _plans_from_nnssl(path: Path, plan: dict, cfg_name: str, pcfg: dict, n_in: int, arch: dict) -> dict:
    """nnU-Net plans from an nnssl pretraining plan: its spacing (None for ``noresample``/``median`` without one:
    filled from the labeled dataset's fingerprint, see :func:`complete_plans`), normalization, transposes."""
    schemes = list(pcfg.get("normalization_schemes") or [])
    unknown = [s for s in schemes if s not in NORMALIZATION]
    if not schemes or unknown:
        raise BadInputError(path, f"pretrain normalization {schemes} has no nnU-Net equivalent "
                                  f"({', '.join(NORMALIZATION)})")
    if "CTNormalization" in schemes:
        raise BadInputError(path, "CTNormalization needs the pretraining pool's intensity statistics, which an "
                                  "nnssl plan does not carry")
    schemes = [NORMALIZATION[s] for s in schemes]
    if len(schemes) == 1 and n_in > 1:
        schemes = schemes * n_in
    use_mask = pcfg.get("use_mask_for_norm", False)
    use_mask = [bool(use_mask)] * len(schemes) if not isinstance(use_mask, (list, tuple)) else \
        [bool(u) for u in use_mask] + [bool(use_mask[-1]) if use_mask else False] * (len(schemes) - len(use_mask))
    spacing = pcfg.get("spacing")
    if spacing is None and pcfg.get("spacing_style") == "onemmiso":
        spacing = [1.0, 1.0, 1.0]
    data_kw = dict(pcfg.get("resampling_fn_data_kwargs") or {"is_seg": False, "order": 3, "order_z": 0,
                                                              "force_separate_z": None})
    cfg = {"data_identifier": f"nnssl_{cfg_name}_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
           "batch_size": 2, "patch_size": [int(p) for p in pcfg.get("patch_size") or [160, 160, 160]],
           "median_image_size_in_voxels": None, "spacing": None if spacing is None else [float(s) for s in spacing],
           "normalization_schemes": schemes, "use_mask_for_norm": use_mask[:len(schemes)],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": data_kw,
           "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_seg_kwargs": {**data_kw, "is_seg": True, "order": 1},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities_kwargs": {**data_kw, "is_seg": False, "order": 1},
           "architecture": arch, "batch_dice": False, "nnssl_spacing_style": pcfg.get("spacing_style")}
    tf = list(plan.get("transpose_forward") or [0, 1, 2])
    return {"dataset_name": plan.get("dataset_name", "nnssl_pretraining"), "plans_name": "nnsslPlans",
            "original_median_spacing_after_transp": list(plan.get("original_median_spacing_after_transp")
                                                         or cfg["spacing"] or [1.0, 1.0, 1.0]),
            "original_median_shape_after_transp": None, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": tf, "transpose_backward": list(plan.get("transpose_backward") or tf),
            "configurations": {"3d_fullres": cfg}, "experiment_planner_used": "ssl3d.training.external.nnssl",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {str(c): {} for c in range(len(schemes))}}


# ssl3d methods whose downstream network is the ResEnc U-Net nnssl's ResEnc-L path fine-tunes
NNSSL_EXPORTABLE = ("spark", "simclr", "mocov2", "byol", "voco")
DYNAMIC_FIELDS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_blocks_per_stage",
                  "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                  "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


def adaptation_plan(source: PretrainedSource) -> dict:
    """``AdaptationPlan.serialize()`` of an ssl3d ResEnc pretraining: ``ResidualEncoderUNet`` with its
    ``arch_kwargs`` (nnssl's ``DynamicArchitecturePlans`` fields), the pretraining plan as an nnssl ``Plan``."""
    plans, cfg = source.plans, source.plans["configurations"]["3d_fullres"]
    kw = source.architecture["arch_kwargs"]
    arch_kwargs = {f: copy.deepcopy(kw.get(f)) for f in DYNAMIC_FIELDS}
    # nnssl's get_kwargs_requiring_import: the fields holding a class (a dotted name once serialized)
    req = [f for f in DYNAMIC_FIELDS if isinstance(arch_kwargs[f], str)]
    spacing = [float(v) for v in cfg["spacing"]]
    style = "onemmiso" if spacing == [1.0, 1.0, 1.0] else "median"
    pcfg = {"data_identifier": cfg["data_identifier"], "preprocessor_name": cfg["preprocessor_name"],
            "spacing_style": style, "normalization_schemes": list(cfg["normalization_schemes"]),
            "use_mask_for_norm": [bool(u) for u in cfg["use_mask_for_norm"]],
            "resampling_fn_data": cfg["resampling_fn_data"],
            "resampling_fn_data_kwargs": dict(cfg["resampling_fn_data_kwargs"]),
            "resampling_fn_mask": cfg["resampling_fn_seg"],
            "resampling_fn_mask_kwargs": dict(cfg["resampling_fn_seg_kwargs"]),
            "spacing": spacing, "patch_size": [int(p) for p in source.patch_size]}
    plan = {"dataset_name": plans["dataset_name"], "plans_name": plans["plans_name"],
            "original_median_spacing_after_transp": [float(v) for v in plans["original_median_spacing_after_transp"]],
            "image_reader_writer": plans["image_reader_writer"], "transpose_forward": list(plans["transpose_forward"]),
            "transpose_backward": list(plans["transpose_backward"]), "configurations": {style: pcfg},
            "experiment_planner_used": plans["experiment_planner_used"]}
    return {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch_kwargs,
                                   "arch_kwargs_requiring_import": req},
            "pretrain_plan": plan, "pretrain_num_input_channels": int(source.n_channels),
            "recommended_downstream_patchsize": [int(p) for p in source.patch_size],
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
            "key_to_lpe": None}


def write_nnssl_checkpoint(source: PretrainedSource, output: str | Path, seed: int | None = None) -> dict:
    """An nnssl checkpoint (``network_weights`` of the ResEnc U-Net with the pretrained encoder + the adaptation
    plan) that ``torch.load(weights_only=True)`` reads; ``ssl3d_plans`` keeps the exact nnU-Net plans (pool
    intensity statistics included) for ssl3d's own import."""
    from ssl3d.training.export import downstream_network
    from ssl3d.utils import DEFAULT_SEED, atomic_write

    if source.kind != "ssl3d" or source.method_name not in NNSSL_EXPORTABLE:
        raise BadInputError(source.checkpoint, f"--format nnssl is for the ResEnc-based ssl3d methods "
                                               f"({', '.join(NNSSL_EXPORTABLE)}); '{source.method_name}' "
                                               f"exports in the nnunet format only")
    if source.architecture.get("network_class_name") != RESENC_CLASS:
        raise BadInputError(source.checkpoint, f"downstream network {source.architecture.get('network_class_name')}"
                                               " is not nnssl's ResidualEncoderUNet")
    net = downstream_network(source, 2, DEFAULT_SEED if seed is None else seed)
    payload = {"network_weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
               "nnssl_adaptation_plan": adaptation_plan(source), "trainer_name": f"ssl3d_{source.method_name}",
               "ssl3d_plans": copy.deepcopy(source.plans),
               "ssl3d": {"method": source.method_name, "source_checkpoint": str(source.checkpoint),
                         "encoder_tensors": len(source.encoder_state)}}
    output = Path(output)
    atomic_write(output, lambda f: torch.save(payload, f))
    logger.info("nnssl checkpoint %s (%d pretrained encoder tensors) from %s", output, len(source.encoder_state),
                source.checkpoint)
    return {"file": output, "architecture": source.architecture, "method": source.method_name,
            "encoder_tensors": len(source.encoder_state)}


register_format("nnssl", sniff, load_nnssl)
