"""Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer points at this folder).

nnU-Net imports every module here as a top-level name and searches it for the trainer class by name, both
in ``nnUNetv2_train`` and at prediction time; the classes themselves live in the installed ssl3d package.
Every registered method's pretrainer is exposed under its registry name.
"""
from ssl3d.training.finetuning import MedContextTrainer, SSLFinetuneTrainer  # noqa: F401
from ssl3d.training.methods import method_specs
from ssl3d.training.pretraining import SSLPretrainer, pretrainer_class  # noqa: F401

for _name in method_specs():
    _cls = pretrainer_class(_name)
    globals()[_cls.__name__] = _cls
