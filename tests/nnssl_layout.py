"""Checkpoints in MIC-DKFZ/nnssl's exact layout (``AbstractBaseTrainer.save_checkpoint`` with
``AdaptationPlan.serialize()``), random weights, tiny networks: what the nnssl import tests read."""
from __future__ import annotations

import torch

TINY_RESENC = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
               "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
               "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
               "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
               "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
               "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
RESENC_KEYS = {"key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
               "keys_to_in_proj": ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"),
               "key_to_lpe": None}
PRIMUS_KEYS = {"key_to_encoder": "eva", "key_to_stem": "down_projection", "keys_to_in_proj": ("down_projection.proj",),
               "key_to_lpe": "eva.pos_embed"}
TINY_PRIMUS = {"embed_dim": 24, "eva_depth": 1, "eva_numheads": 2}  # stands in for a PrimusS preset in tests


def pretrain_plan(patch, style="onemmiso", spacing=(1.0, 1.0, 1.0), schemes=("ZScoreNormalization",)) -> dict:
    """``Plan.serialize()``: one configuration, named by its spacing style as nnssl does."""
    cfg = {"data_identifier": f"nnsslPlans_{style}", "preprocessor_name": "DefaultPreprocessor",
           "spacing_style": style, "normalization_schemes": list(schemes), "use_mask_for_norm": False,
           "resampling_fn_data": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_mask": "resample_data_or_seg_to_shape",
           "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
           "spacing": None if spacing is None else list(spacing), "patch_size": list(patch)}
    return {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {style: cfg},
            "experiment_planner_used": "ExperimentPlanner"}


def adaptation_plan(arch_class_name, arch_kwargs, keys, patch, recommended=None, n_in=1, **plan_kw) -> dict:
    req = None
    if arch_kwargs:  # DynamicArchitecturePlans.get_kwargs_requiring_import: classes (or their names)
        req = [k for k, v in arch_kwargs.items() if isinstance(v, str)]
    return {"architecture_plans": {"arch_class_name": arch_class_name, "arch_kwargs": arch_kwargs,
                                   "arch_kwargs_requiring_import": req},
            "pretrain_plan": pretrain_plan(patch, **plan_kw), "pretrain_num_input_channels": n_in,
            "recommended_downstream_patchsize": tuple(recommended or patch), **keys}


def checkpoint(weights: dict, plan: dict, trainer: str) -> dict:
    """What nnssl's ``save_checkpoint`` writes (optimizer etc. as a short run leaves them)."""
    return {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": 1,
            "init_args": {"plan": {}, "configuration_name": "onemmiso", "fold": 0}, "trainer_name": trainer,
            "nnssl_adaptation_plan": plan}


def resenc_checkpoint(patch=(16, 32, 32), n_in=1, seed=0, **plan_kw) -> dict:
    """nnssl's MAE on a ResidualEncoderUNet given by arch_kwargs (BaseMAETrainer variants): the whole network."""
    import pydoc

    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(seed)
    kw = {k: (pydoc.locate(v) if k in ("conv_op", "norm_op", "nonlin") else v) for k, v in TINY_RESENC.items()}
    net = ResidualEncoderUNet(input_channels=n_in, num_classes=1, **kw)
    for p in net.parameters():
        p.data.normal_()
    plan = adaptation_plan("ResidualEncoderUNet", dict(TINY_RESENC), RESENC_KEYS, patch, n_in=n_in, **plan_kw)
    return checkpoint(net.state_dict(), plan, "BaseMAETrainer_ResEncL")


def primus_checkpoint(patch=(16, 16, 16), recommended=(16, 32, 32), embed=(4, 4, 4), seed=0) -> dict:
    """nnssl's EvaMAE (Primus encoder ``down_projection`` + ``eva`` with layer scale and inner attention norm,
    a patch decoder, a mask token, an EVA decoder): keys as EvaMAE's state_dict."""
    from dynamic_network_architectures.architectures.primus import Primus

    torch.manual_seed(seed)
    net = Primus(1, TINY_PRIMUS["embed_dim"], embed, 1, TINY_PRIMUS["eva_depth"], TINY_PRIMUS["eva_numheads"],
                 input_shape=patch, init_values=0.1, scale_attn_inner=True)
    sd = net.state_dict()
    for v in sd.values():
        v.normal_()
    sd["decoder.norm.weight"] = torch.randn(TINY_PRIMUS["embed_dim"])  # EvaMAE's decoder (not transferred)
    plan = adaptation_plan("PrimusS", None, PRIMUS_KEYS, patch, recommended)
    return checkpoint(sd, plan, "BaseEvaMAETrainer")
