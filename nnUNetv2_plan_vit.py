"""Plan a 2d configuration for a ViT config and preprocess it: see `python nnUNetv2_plan_vit.py -h`."""

# Imported under the guard: upstream's worker pools spawn their processes, and each imports this script again.
if __name__ == "__main__":
    from nnunetv2.vit.plan import main

    main()
