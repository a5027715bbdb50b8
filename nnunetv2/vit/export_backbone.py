"""``nnUNetv2_export_backbone_vit.py``: the backbone of a trained model as a timm state dict file.

A backbone trained on one dataset is reused on another through ``model.checkpoint_path``, which reads timm's
format: this writes that file from a checkpoint of ``nnUNetTrainer_vit``. LoRA adapters are merged into the
weights first (peft's ``merge_and_unload``), so the file is a plain backbone of the family and size the model was
trained with (the same ``model.backbone`` / ``model.backbone_size`` load it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import torch

from nnunetv2.vit.cli import run_main
from nnunetv2.vit.config import build_model, quiet_model_logs
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.trained_model import network_weights, read_training_checkpoint, stored_config

PROG = "nnUNetv2_export_backbone_vit.py"
BACKBONE = "backbone."


def export_backbone(checkpoint_file: Path, output_file: Path, trust: bool = False) -> int:
    """Write the backbone of ``checkpoint_file`` to ``output_file`` as a timm state dict (``torch.save`` of a dict of
    tensors, or safetensors for a ``.safetensors`` name), written whole or not at all. Returns the tensor count."""
    checkpoint = read_training_checkpoint(checkpoint_file, trust=trust)
    configuration = checkpoint.get("init_args", {}).get("configuration") if isinstance(checkpoint, dict) else None
    config = stored_config(checkpoint, configuration) if configuration else None
    if config is None:
        raise ConfigError(f"{checkpoint_file} is not a checkpoint of nnUNetTrainer_vit (it holds no ViT config).")
    weights = {k: v for k, v in network_weights(checkpoint).items() if k.startswith(BACKBONE)}
    in_channels = next(v.shape[1] for k, v in weights.items() if k.endswith("patch_embed.proj.weight"))
    with quiet_model_logs():
        model = build_model(config, in_channels, num_classes=2, load_weights=False)
    missing = [k for k in model.state_dict() if k.startswith(BACKBONE) and k not in weights]
    if missing:
        raise ConfigError(f"{checkpoint_file} lacks {len(missing)} backbone tensors of its own config "
                          f"(e.g. {', '.join(missing[:3])}); it is damaged or from another model.")
    model.load_state_dict(weights, strict=False)
    model.disable_lora()
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.vit.state_dict().items()}
    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(output_file.name + ".partial")
    if output_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(partial))
    else:
        torch.save(state, partial)
    partial.replace(output_file)
    return len(state)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Write the backbone of a trained nnUNetTrainer_vit checkpoint as a timm state dict, "
                               "for model.checkpoint_path of another training (LoRA merged in).")
    parser.add_argument("checkpoint", type=Path, help="e.g. nnUNet_results/.../fold_0/checkpoint_final.pth")
    parser.add_argument("output", type=Path, help="the backbone file to write (.pth, or .safetensors)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load the checkpoint as a full pickle (it can run code); only for files you trust")
    return parser


def run(args: argparse.Namespace) -> None:
    count = export_backbone(args.checkpoint, args.output, args.trust_checkpoint)
    print(f"Wrote {count} backbone tensors to {args.output}; use it as model.checkpoint_path with the same "
          f"model.backbone and model.backbone_size.")


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_main(PROG, lambda: run(args))


if __name__ == "__main__":
    main()
