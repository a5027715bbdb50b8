"""Predict with a trained ViT segmentation model: see `python nnUNetv2_predict_vit.py -h`."""

# Imported under the guard: upstream's worker pools spawn their processes, and each imports this script again.
if __name__ == "__main__":
    from nnunetv2.vit.predict import main

    main()
