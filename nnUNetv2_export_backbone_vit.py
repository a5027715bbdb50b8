"""Export a trained model's backbone as a timm state dict: see `python nnUNetv2_export_backbone_vit.py -h`."""

from nnunetv2.vit.export_backbone import main

if __name__ == "__main__":
    main()
