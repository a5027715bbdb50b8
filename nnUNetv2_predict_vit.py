"""Predict with a trained ViT segmentation model: see `python nnUNetv2_predict_vit.py -h`."""

from nnunetv2.vit.predict import main

if __name__ == "__main__":
    main()
