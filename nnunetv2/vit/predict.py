"""``nnUNetv2_predict_vit.py``: upstream ``nnUNetv2_predict`` with ``-tr`` defaulting to nnUNetTrainer_vit.

Prediction is upstream's own (sliding window, mirroring, export); the network is rebuilt from the
config stored in the results folder's plans.json, so neither the YAML file nor a download is needed.
Before anything is written, the model folder, its checkpoints and the input images are checked.
``ViTPredictor`` is upstream's ``nnUNetPredictor`` with its own initialisation from a trained model
folder: the trainer class is resolved without upstream's ``sys.modules`` scan (``find_trainer_class``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch._dynamo import OptimizedModule

from nnunetv2.vit.cli import dataset_name, run_main
from nnunetv2.vit.compiling import CompileLog
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.lifetime import end_workers_with_this_process

DEFAULT_TRAINER = "nnUNetTrainer_vit"
TRUST_FLAG = "--trust_checkpoint"


class ViTPredictor(nnUNetPredictor):
    """nnU-Net's predictor; initialised from a trained model folder as upstream's, except that checkpoints
    are read as data (``trust_checkpoint``: as full pickles, which can run code) and the trainer class is
    resolved by ``find_trainer_class`` (or given as ``trainer_class``)."""

    def __init__(self, *args, trust_checkpoint: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trust_checkpoint = trust_checkpoint

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Tuple[Union[int, str], ...], None],
                                             checkpoint_name: str = "checkpoint_final.pth",
                                             trainer_class: Optional[type] = None) -> None:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.vit.stored import network_weights, read_training_checkpoint
        from nnunetv2.vit.trainer import find_trainer_class

        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        folder = Path(model_training_output_dir)
        dataset_json = load_json(str(folder / "dataset.json"))
        plans_manager = PlansManager(load_json(str(folder / "plans.json")))
        checkpoints = [read_training_checkpoint(str(folder / f"fold_{fold}" / checkpoint_name),
                                                trust=self.trust_checkpoint)
                       for fold in ([use_folds] if isinstance(use_folds, str) else use_folds)]
        first = checkpoints[0]
        configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
        trainer_class = trainer_class or find_trainer_class(first["trainer_name"])
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        parameters = [network_weights(checkpoint) for checkpoint in checkpoints]
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first.get("inference_allowed_mirroring_axes"))

    def manual_initialization(self, network: torch.nn.Module, *args, **kwargs) -> None:
        """Upstream's; when it compiles the network (``nnUNet_compile``), the first tile says so and how long
        compiling took."""
        super().manual_initialization(network, *args, **kwargs)
        if isinstance(self.network, OptimizedModule):
            patch = tuple(self.configuration_manager.patch_size)
            CompileLog(print, forward_warnings=False).first_forward(
                self.network, "prediction tile", f"sliding window, 1 x {patch}", self.device)


def predictor_from_trained_model(model_folder: Union[str, Path], folds: Sequence[Union[int, str]] = (0,),
                                 device: torch.device = torch.device("cuda"),
                                 checkpoint_name: str = "checkpoint_final.pth",
                                 trainer_class: Optional[type] = None, trust_checkpoint: bool = False) -> ViTPredictor:
    """A predictor for a trained model folder with upstream's defaults (TTA, Gaussian tiles), quiet."""
    predictor = ViTPredictor(device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                             trust_checkpoint=trust_checkpoint)
    predictor.initialize_from_trained_model_folder(str(model_folder), tuple(folds), checkpoint_name, trainer_class)
    return predictor


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


def check_model_and_inputs(argv: Sequence[str], trust_checkpoint: bool = False) -> None:
    """Refuse a missing model, a checkpoint of another model or beyond plain data, or an input folder with a case
    that cannot be predicted (``check_input_images``)."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.vit.stored import read_training_checkpoint, require_same_model, stored_config

    args = _known_args(argv)
    if None in (args.i, args.d, args.c):
        return  # upstream's parser reports the missing required flags
    model_folder = Path(get_output_folder(dataset_name(args.d), args.tr, args.p, args.c))
    if not (model_folder / "plans.json").is_file():
        raise ConfigError(f"No trained model in {model_folder} (check -d, -tr, -p and -c).")
    plans = load_json(str(model_folder / "plans.json"))
    config = stored_config(plans, args.c)
    if config is None:
        raise ConfigError(f"{model_folder / 'plans.json'} holds no ViT model config for configuration '{args.c}'.")

    for fold in args.f:
        checkpoint_file = model_folder / f"fold_{fold}" / args.chk
        if not checkpoint_file.is_file():
            raise ConfigError(f"Checkpoint {checkpoint_file} not found; pass the trained folds with -f "
                              f"(e.g. -f 0) or another checkpoint with -chk.")
        # mmap: only the small metadata is read here, the weights are read once by the predictor
        checkpoint = read_training_checkpoint(str(checkpoint_file), mmap=True, trust=trust_checkpoint)
        require_same_model(stored_config(checkpoint, args.c), config, str(checkpoint_file),
                           str(model_folder / "plans.json"))

    dataset_json = load_json(str(model_folder / "dataset.json"))
    reader = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    check_input_images(Path(args.i), dataset_json, reader)


MAX_LISTED = 10  # bad cases named in the error; the rest are counted
MAX_REASON = 300  # characters of a reader's error shown per case


def check_input_images(folder: Path, dataset_json: dict, reader) -> None:
    """Refuse the input folder, before anything is predicted, unless every case in it can be: all files named
    ``CASE_XXXX<ending>``, each case's channel files numbered 0000 to N-1, readable by the model's image reader,
    and giving the model's channel count. One error names every bad case (upstream's workers met them one by
    one, mid-way, with an IndexError and a hint about full RAM)."""
    ending = dataset_json["file_ending"]
    expected = len(dataset_json["channel_names"])
    images = sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []
    if not images:
        raise ConfigError(f"No input images ending in '{ending}' in {folder}.")
    cases: Dict[str, Dict[int, Path]] = {}
    problems = []
    for path in images:
        match = re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(ending)}", path.name)
        if match is None:
            problems.append(f"{path.name}: not named CASE_XXXX{ending} (XXXX: the channel index, e.g. "
                            f"case_0000{ending})")
        else:
            cases.setdefault(match[1], {})[int(match[2])] = path
    for case, files in cases.items():
        indices = sorted(files)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            problems.append(f"{case}: channel files {', '.join(f'{i:04d}' for i in indices)} (missing "
                            f"{', '.join(f'{i:04d}' for i in missing)}; they must be numbered from 0000 on)")
            continue
        printed = io.StringIO()  # upstream's readers print some of their errors instead of raising them
        try:
            with contextlib.redirect_stdout(printed):
                channels = reader.read_images([str(files[i]) for i in indices])[0].shape[0]
        except Exception as err:  # whatever the reader raises, the case cannot be predicted
            reason = " ".join(f"{err} {printed.getvalue()}".split()) or type(err).__name__
            problems.append(f"{case}: unreadable by {type(reader).__name__} ({reason[:MAX_REASON]})")
            continue
        if channels != expected:
            where = (f"{case}_0000{ending}" if len(indices) == 1 else
                     f"{len(indices)} file(s) {case}_0000{ending}..{case}_{indices[-1]:04d}{ending}")
            problems.append(f"{case}: {channels} channel(s) in {where}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        names = list(dataset_json["channel_names"].values())
        raise ConfigError(f"{len(problems)} of the inputs in {folder} cannot be predicted, so nothing was: {listed}"
                          f"{more}. The model expects {expected} input channel(s) {names} per case. Fix or move "
                          f"these files and run again.")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    end_workers_with_this_process()  # upstream's preprocessing and export workers, its Manager's server
    if "-tr" not in argv:
        argv = ["-tr", DEFAULT_TRAINER, *argv]
    # Ours, not upstream's: load the checkpoints as full pickles (they can run code) for a model one trusts.
    trust = TRUST_FLAG in argv
    argv = [arg for arg in argv if arg != TRUST_FLAG]

    def predict() -> None:
        from nnunetv2.inference import predict_from_raw_data

        check_model_and_inputs(argv, trust)
        sys.argv = ["nnUNetv2_predict_vit.py", *argv]
        # Upstream's command line, with ViTPredictor in place of the predictor class it builds.
        upstream_predictor = predict_from_raw_data.nnUNetPredictor
        predict_from_raw_data.nnUNetPredictor = functools.partial(ViTPredictor, trust_checkpoint=trust)
        try:
            predict_from_raw_data.predict_entry_point()
        finally:
            predict_from_raw_data.nnUNetPredictor = upstream_predictor

    run_main("nnUNetv2_predict_vit.py", predict)


if __name__ == "__main__":
    main()
