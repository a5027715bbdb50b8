"""Backbone normalization as an nnU-Net normalization scheme, applied by upstream's preprocessing and prediction.

Like upstream's ``CTNormalization``, it reads its parameters (intensity range, pretraining mean and std) from the
channel's ``foreground_intensity_properties_per_channel`` entry in the plans, the only thing upstream hands a scheme,
so training data and predicted cases see the same values. ``upstream_adapter`` makes upstream find it by name.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization

PARAMETERS_KEY = "backbone_normalization"  # in a channel's intensity properties: BackboneNormalization's parameters


class BackboneNormalization(ImageNormalization):
    """Intensities as the backbone's pretraining saw them: scaled from ``[low, high]`` to 0-1, then
    ``(x - mean) / std`` with the pretraining statistics of the channel.

    For 8-bit images (``clip`` false, range 0-255) this is upstream's ``RGBTo01Normalization`` followed by the
    pretraining normalization, and values outside 0-255 are refused: such an image is not like the planned ones.
    Other ranges (the dataset's foreground 0.5 and 99.5 percentiles) are clipped, as ``CTNormalization`` does.
    """

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image: np.ndarray, seg: np.ndarray = None) -> np.ndarray:
        parameters = self.intensityproperties.get(PARAMETERS_KEY)
        if parameters is None:
            raise RuntimeError(
                f"BackboneNormalization needs its parameters in the plans' foreground_intensity_properties_per_channel "
                f"(key '{PARAMETERS_KEY}'), which nnUNetv2_plan_vit.py writes; plan the configuration with it instead "
                f"of editing the plans by hand.")
        low, high = float(parameters["low"]), float(parameters["high"])
        image = image.astype(self.target_dtype, copy=False)
        if parameters["clip"]:
            np.clip(image, low, high, out=image)
        elif image.size and (image.min() < low or image.max() > high):
            raise ValueError(
                f"BackboneNormalization: intensities from {image.min():g} to {image.max():g} in a channel planned for "
                f"8-bit images (0-255). These images are not like the ones the configuration was planned on; "
                f"convert them to 8 bits, or plan a configuration on data like them (nnUNetv2_plan_vit.py).")
        image -= low
        image /= high - low
        image -= parameters["mean"]
        image /= parameters["std"]
        return image

