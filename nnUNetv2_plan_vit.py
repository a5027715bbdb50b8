"""Plan a 2d configuration for a ViT config and preprocess it: see `python nnUNetv2_plan_vit.py -h`."""

from nnunetv2.vit.plan import main

if __name__ == "__main__":
    main()
