"""``nnUNetv2_predict_vit.py``: upstream ``nnUNetv2_predict`` with ``-tr`` defaulting to nnUNetTrainer_vit.

Prediction is upstream's own (sliding window, mirroring, export); the network is rebuilt from the
config stored in the results folder's plans.json, so neither the YAML file nor a download is needed.
Before anything is written, the model folder, its checkpoints and the input images are checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.vit.cli import dataset_name, register_trainer_discovery, run_main
from nnunetv2.vit.errors import ConfigError

DEFAULT_TRAINER = "nnUNetTrainer_vit"


def _known_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, default in (("-i", None), ("-d", None), ("-tr", DEFAULT_TRAINER), ("-p", "nnUNetPlans"), ("-c", None),
                          ("-chk", "checkpoint_final.pth")):
        parser.add_argument(flag, default=default)
    # Declared so argparse does not read e.g. "-device" as "-d evice".
    for flag in ("-o", "-step_size", "-npp", "-nps", "-prev_stage_predictions", "-num_parts", "-part_id", "-device"):
        parser.add_argument(flag)
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"])
    return parser.parse_known_args(list(argv))[0]


def check_model_and_inputs(argv: Sequence[str]) -> None:
    """Refuse a missing model, a checkpoint of another model, or images with the wrong channel count."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.vit.trainer import (
        describe_model, read_training_checkpoint, same_model, stored_vit_config, vit_config_in_plans,
    )

    args = _known_args(argv)
    if None in (args.i, args.d, args.c):
        return  # upstream's parser reports the missing required flags
    model_folder = Path(get_output_folder(dataset_name(args.d), args.tr, args.p, args.c))
    if not (model_folder / "plans.json").is_file():
        raise ConfigError(f"No trained model in {model_folder} (check -d, -tr, -p and -c).")
    plans = load_json(str(model_folder / "plans.json"))
    config = vit_config_in_plans(plans, args.c)
    if config is None:
        raise ConfigError(f"{model_folder / 'plans.json'} holds no ViT model config for configuration '{args.c}'.")

    for fold in args.f:
        checkpoint_file = model_folder / f"fold_{fold}" / args.chk
        if not checkpoint_file.is_file():
            raise ConfigError(f"Checkpoint {checkpoint_file} not found; pass the trained folds with -f "
                              f"(e.g. -f 0) or another checkpoint with -chk.")
        # mmap: only the small metadata is read here, the weights are read once by the predictor
        checkpoint = read_training_checkpoint(str(checkpoint_file), mmap=True)
        stored = stored_vit_config(checkpoint, args.c)
        if stored is not None and not same_model(stored, config):
            raise ConfigError(f"{checkpoint_file} holds a different model ({describe_model(stored)}) than "
                              f"{model_folder / 'plans.json'} ({describe_model(config)}).")

    dataset_json = load_json(str(model_folder / "dataset.json"))
    expected = len(dataset_json["channel_names"])
    ending = dataset_json["file_ending"]
    images = sorted(Path(args.i).glob(f"*{ending}")) if Path(args.i).is_dir() else []
    if not images:
        raise ConfigError(f"No input images ending in '{ending}' in {args.i}.")
    first_case = images[0].name[: -len(ending) - 5]
    files = [str(p) for p in images if p.name[: -len(ending) - 5] == first_case]
    reader = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    channels = reader.read_images(files)[0].shape[0]
    if channels != expected:
        names = list(dataset_json["channel_names"].values())
        raise ConfigError(f"The model expects {expected} input channel(s) {names}, "
                          f"but case '{first_case}' in {args.i} has {channels}.")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-tr" not in argv:
        argv = ["-tr", DEFAULT_TRAINER, *argv]

    def predict() -> None:
        from nnunetv2.inference.predict_from_raw_data import predict_entry_point

        register_trainer_discovery()
        check_model_and_inputs(argv)
        sys.argv = ["nnUNetv2_predict_vit.py", *argv]
        predict_entry_point()

    run_main("nnUNetv2_predict_vit.py", predict)


if __name__ == "__main__":
    main()
