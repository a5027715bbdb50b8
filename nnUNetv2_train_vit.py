"""Train a ViT segmentation model with nnU-Net v2: see `python nnUNetv2_train_vit.py -h`."""

# Imported under the guard: upstream's worker pools spawn their processes, and each imports this script again.
if __name__ == "__main__":
    from nnunetv2.vit.train import main

    main()
