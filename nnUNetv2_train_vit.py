"""Train a ViT segmentation model with nnU-Net v2: see `python nnUNetv2_train_vit.py -h`."""

from nnunetv2.vit.train import main

if __name__ == "__main__":
    main()
