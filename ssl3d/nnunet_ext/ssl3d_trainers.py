"""Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer points at this folder).

nnU-Net imports every module here as a top-level name and searches it for the trainer class by name, both
in ``nnUNetv2_train`` and at prediction time; the classes themselves live in the installed ssl3d package.
"""
from ssl3d.training.finetune import SSLFinetuneTrainer  # noqa: F401
from ssl3d.training.pretrainer import HySparKPretrainer, MAEPretrainer, SparKPretrainer  # noqa: F401
from ssl3d.training.medcontext import MedContextTrainer  # noqa: F401
