"""Prediction inputs are checked as a set before any work: every case's channel files, names and readability."""

from __future__ import annotations

import re

import numpy as np
import pytest
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from PIL import Image

from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.predict import build_parser, check_input_images

RGB_DATASET = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".png"}


def rgb(path, size=(24, 24)) -> None:
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)


def refusal(folder) -> str:
    with pytest.raises(ConfigError) as error:
        check_input_images(folder, RGB_DATASET, NaturalImage2DIO())
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_case_with_extra_channel_files_that_sorts_last_is_refused_before_any_work(tmp_path):
    """Upstream's workers met it last, mid-way, with an IndexError and a hint about full RAM."""
    rgb(tmp_path / "cTs000_0000.png")
    for channel in range(6):
        rgb(tmp_path / f"cTs001_{channel:04d}.png")
    message = refusal(tmp_path)
    assert message.startswith(f"1 of the inputs in {tmp_path} cannot be predicted, so nothing was: ")
    assert "cTs001: 18 channel(s) in 6 file(s) cTs001_0000.png..cTs001_0005.png." in message
    assert "expects 3 input channel(s) ['R', 'G', 'B'] per case" in message and "cTs000" not in message


def test_every_bad_case_is_named_in_one_line(tmp_path):
    rgb(tmp_path / "good_0000.png")
    rgb(tmp_path / "gap_0000.png")
    rgb(tmp_path / "gap_0002.png")
    rgb(tmp_path / "late_0001.png")
    (tmp_path / "broken_0000.png").write_bytes(b"not a png")
    rgb(tmp_path / "sizes_0000.png")
    rgb(tmp_path / "sizes_0001.png", size=(20, 20))
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "grey_0000.png")
    rgb(tmp_path / "unnumbered.png")
    message = refusal(tmp_path)
    assert message.startswith("6 of the inputs")
    assert "gap: channel files 0000, 0002 (missing 0001; they must be numbered from 0000 on)" in message
    assert "late: channel files 0001 (missing 0000;" in message
    assert re.search(r"broken: unreadable by NaturalImage2DIO \(.+\)", message)
    assert "sizes: unreadable by NaturalImage2DIO (ERROR! Not all input images have the same shape!" in message
    assert "grey: 1 channel(s) in grey_0000.png;" in message
    assert "unnumbered.png: not named CASE_XXXX.png" in message
    assert "good" not in message


def test_long_lists_are_cut_and_valid_folders_pass(tmp_path):
    for case in range(12):
        rgb(tmp_path / f"c{case:02d}_0001.png")
    message = refusal(tmp_path)
    assert message.startswith("12 of the inputs") and "; and 2 more." in message
    assert message.count("missing 0000") == 10

    good = tmp_path / "good"
    good.mkdir()
    for case in range(3):
        rgb(good / f"c{case}_0000.png")
    check_input_images(good, RGB_DATASET, NaturalImage2DIO())
    with pytest.raises(ConfigError, match="No input images ending in '.png' in"):
        check_input_images(tmp_path / "empty", RGB_DATASET, NaturalImage2DIO())


def test_the_command_offers_nnunets_predict_flags_with_our_trainer_and_trust():
    """Users know nnUNetv2_predict's flags; -tr defaults to ours; loading full pickles is the user's choice."""
    parser = build_parser()
    usage = parser.format_help()
    for flag in ("-i", "-o", "-d", "-p", "-tr", "-c", "-f", "-step_size", "--disable_tta", "--verbose",
                 "--save_probabilities", "--continue_prediction", "-chk", "-npp", "-nps", "-prev_stage_predictions",
                 "-num_parts", "-part_id", "-device", "--disable_progress_bar", "--not_on_device",
                 "--trust_checkpoint"):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", usage), flag
    args = parser.parse_args(["-i", "in", "-o", "out", "-d", "1", "-c", "2d", "-device", "cpu"])
    assert (args.tr, args.d, args.device, args.f, args.trust_checkpoint) == (
        "nnUNetTrainer_vit", "1", "cpu", ["0", "1", "2", "3", "4"], False)
