"""Self-supervised pretraining trainers (nnU-Net trainer variants for unlabeled data)."""
from ssl3d.training.pretraining.trainer import SSLPretrainer, pretrainer_class

__all__ = ["SSLPretrainer", "pretrainer_class"]
