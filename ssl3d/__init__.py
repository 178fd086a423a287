"""ssl3d: self-configuring self-supervised pretraining for 3D medical images on top of nnU-Net v2."""

__version__ = "0.1.0"
