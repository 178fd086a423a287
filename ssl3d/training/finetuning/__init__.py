"""Fine-tuning trainers that stock ``nnUNetv2_train`` finds through ``nnUNet_extTrainer``."""
from ssl3d.training.finetuning.medcontext import MedContextTrainer
from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer, few_shot_subset

__all__ = ["MedContextTrainer", "SSLFinetuneTrainer", "few_shot_subset"]
