"""Export a trained model's backbone as a timm state dict: see `python nnUNetv2_export_backbone_vit.py -h`."""

# Imported under the guard: upstream's worker pools spawn their processes, and each imports this script again.
if __name__ == "__main__":
    from nnunetv2.vit.export_backbone import main

    main()
