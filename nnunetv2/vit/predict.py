"""``nnUNetv2_predict_vit.py``: nnU-Net's prediction with a trained ViT model, ``-tr`` defaulting to nnUNetTrainer_vit.

Upstream's ``nnUNetPredictor`` through ``manual_initialization``: the network is rebuilt from the results folder's
stored config and takes each fold's checkpoint, read once and as data. Model, checkpoints and inputs are checked before
anything is written. The flags are ``nnUNetv2_predict``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import _getDefaultValue, nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from nnunetv2.vit.cli import dataset_name, get_device, run_main
from nnunetv2.vit.compiling import CompileLog
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.lifetime import end_workers_with_this_process
from nnunetv2.vit.trained_model import network_weights, read_training_checkpoint, require_same_model, stored_config
from nnunetv2.vit.trainer import nnUNetTrainer_vit
from nnunetv2.vit.upstream_adapter import find_trainer_class

PROG = "nnUNetv2_predict_vit.py"
DEFAULT_TRAINER = "nnUNetTrainer_vit"


# nnUNetv2_predict's flags with its defaults (nnunetv2/inference/predict_from_raw_data.py, which also reads nnUNet_npp
# and nnUNet_nps), -tr defaulting to ours, and --trust_checkpoint.
FLAGS = (
    ("-i", dict(required=True, help="input folder: one file per case and channel, CASE_XXXX<file ending>")),
    ("-o", dict(required=True, help="output folder (created); predictions take their case's name")),
    ("-d", dict(required=True, help="dataset name or id")),
    ("-p", dict(default="nnUNetPlans", help="plans identifier")),
    ("-tr", dict(default=DEFAULT_TRAINER, help="trainer class the model was trained with")),
    ("-c", dict(required=True, help="configuration the model was trained with")),
    ("-f", dict(nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble (or 'all')")),
    ("-step_size", dict(type=float, default=0.5, help="sliding window step, as a share of the patch (at most 1)")),
    ("--disable_tta", dict(action="store_true", help="no test-time mirroring: faster, less accurate")),
    ("--verbose", dict(action="store_true", help="report more")),
    ("--save_probabilities", dict(action="store_true", help="also export class probabilities (for ensembling)")),
    ("--continue_prediction", dict(action="store_true", help="keep the predictions already in the output folder")),
    ("-chk", dict(default="checkpoint_final.pth", help="checkpoint file name in each fold folder")),
    ("-npp", dict(type=int, default=_getDefaultValue("nnUNet_npp", int, 3),
                  help="preprocessing processes (0 with -nps 0: none)")),
    ("-nps", dict(type=int, default=_getDefaultValue("nnUNet_nps", int, 3), help="segmentation export processes")),
    ("-prev_stage_predictions", dict(default=None, help="predictions of the previous stage (cascades)")),
    ("-num_parts", dict(type=int, default=1, help="number of separate calls sharing the input folder")),
    ("-part_id", dict(type=int, default=0, help="which of the -num_parts calls this is (0 to num_parts - 1)")),
    ("-device", dict(default="cuda", help="cuda, cpu or mps (pick the GPU with CUDA_VISIBLE_DEVICES)")),
    ("--disable_progress_bar", dict(action="store_true", help="no progress bar (non-interactive jobs)")),
    ("--not_on_device", dict(action="store_true", help="keep whole cases off the device (large cases)")),
    ("--trust_checkpoint", dict(action="store_true", help="load the checkpoints as full pickles, which can run "
                                                          "code: only for a model from a source you trust")),
)


def build_parser() -> argparse.ArgumentParser:
    description = f"Predict with a trained ViT segmentation model: nnUNetv2_predict's flags, -tr {DEFAULT_TRAINER}."
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    for flag, options in FLAGS:
        shown = options.get("default") is not None
        parser.add_argument(flag, **{**options, "help": options["help"] + (" (default: %(default)s)" if shown else "")})
    return parser


def predictor_from_trained_model(model_folder: Union[str, Path], folds: Sequence[Union[int, str]] = (0,),
                                 checkpoint_name: str = "checkpoint_final.pth", trust_checkpoint: bool = False,
                                 configuration: Optional[str] = None, trainer_class: Optional[type] = None,
                                 **options: Any) -> nnUNetPredictor:
    """Upstream's ``nnUNetPredictor(**options)`` (quiet by default) set up through ``manual_initialization`` for a
    trained model folder, each checkpoint read once and as data (unless ``trust_checkpoint``). A missing checkpoint,
    or one of another model than the folder's plans hold for ``configuration`` (default: the first checkpoint's), is
    refused. ``trainer_class`` builds the network (default: the checkpoints' trainer); one not derived from
    nnUNetTrainer_vit (the benchmarks' U-Net) skips the ViT checks. A compiled network's first tile logs its compile."""
    folder = Path(model_folder)
    plans_file = folder / "plans.json"
    if not plans_file.is_file():
        raise ConfigError(f"No trained model in {folder} (check -d, -tr, -p and -c).")
    plans = load_json(str(plans_file))
    vit = trainer_class is None or issubclass(trainer_class, nnUNetTrainer_vit)
    config, checkpoints = None, []
    for fold in folds:
        checkpoint_file = folder / f"fold_{fold}" / checkpoint_name
        if not checkpoint_file.is_file():
            raise ConfigError(f"Checkpoint {checkpoint_file} not found; pass the trained folds with -f "
                              f"(e.g. -f 0) or another checkpoint with -chk.")
        checkpoint = read_training_checkpoint(str(checkpoint_file), mmap=True, trust=trust_checkpoint)
        configuration = configuration or checkpoint["init_args"]["configuration"]
        if vit:
            config = config or stored_config(plans, configuration)  # the plans' config, read for the first fold
            if config is None:
                raise ConfigError(f"{plans_file} holds no ViT model config for configuration '{configuration}'.")
            require_same_model(stored_config(checkpoint, configuration), config, str(checkpoint_file),
                               str(plans_file))
        checkpoints.append(checkpoint)

    first = checkpoints[0]
    dataset_json = load_json(str(folder / "dataset.json"))
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_class = trainer_class or find_trainer_class(first["trainer_name"])
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    parameters = [network_weights(checkpoint) for checkpoint in checkpoints]
    network.load_state_dict(parameters[0])  # as upstream's initialize_from_trained_model_folder
    predictor = nnUNetPredictor(**{"verbose": False, "verbose_preprocessing": False, "allow_tqdm": False, **options})
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
    if isinstance(predictor.network, OptimizedModule):
        patch = tuple(configuration_manager.patch_size)
        CompileLog(print, forward_warnings=False).first_forward(
            predictor.network, "prediction tile", f"sliding window, 1 x {patch}", predictor.device)
    return predictor


MAX_LISTED = 10  # bad cases named in the error; the rest are counted
MAX_REASON = 300  # characters of a reader's error shown per case


def check_input_images(folder: Path, dataset_json: dict, reader) -> None:
    """Refuse the input folder unless every case can be predicted: named ``CASE_XXXX<ending>``, channels 0000 to N-1,
    readable, the model's channel count. One error names every bad case (upstream's workers fail one by one)."""
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


def predict(args: argparse.Namespace) -> None:
    """Check the command, the model and the inputs, then predict as ``nnUNetv2_predict`` does."""
    if not 0 <= args.part_id < args.num_parts:
        raise ConfigError(f"-part_id {args.part_id} is not one of the -num_parts {args.num_parts} parts: pass "
                          f"-part_id 0 to {args.num_parts - 1}.")
    predictor = predictor_from_trained_model(
        get_output_folder(dataset_name(args.d), args.tr, args.p, args.c), args.f, args.chk, args.trust_checkpoint,
        args.c, tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
        perform_everything_on_device=not args.not_on_device, device=get_device(args.device), verbose=args.verbose,
        verbose_preprocessing=args.verbose, allow_tqdm=not args.disable_progress_bar)
    check_input_images(Path(args.i), predictor.dataset_json, predictor.plans_manager.image_reader_writer_class())
    os.makedirs(args.o, exist_ok=True)  # upstream's sequential prediction does not make it
    if args.npp == 0 and args.nps == 0:  # upstream's switch to predicting in this process only
        predictor.predict_from_files_sequential(args.i, args.o, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction,
                                                folder_with_segs_from_prev_stage=args.prev_stage_predictions)
    else:
        predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps,
                                     folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                     num_parts=args.num_parts, part_id=args.part_id)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    end_workers_with_this_process()  # upstream's preprocessing and export workers, its Manager's server
    run_main(PROG, lambda: predict(args))


if __name__ == "__main__":
    main()
