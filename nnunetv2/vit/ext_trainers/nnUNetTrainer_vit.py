"""Lets upstream's trainer discovery (``nnUNet_extTrainer``) find nnUNetTrainer_vit."""

from nnunetv2.vit.trainer import nnUNetTrainer_vit

__all__ = ["nnUNetTrainer_vit"]
