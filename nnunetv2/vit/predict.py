"""``nnUNetv2_predict_vit.py``: upstream ``nnUNetv2_predict`` with ``-tr`` defaulting to nnUNetTrainer_vit.

Prediction is upstream's own (sliding window, mirroring, export); the network is rebuilt from the
config stored in the results folder's plans.json, so neither the YAML file nor a download is needed.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from nnunetv2.vit.cli import register_trainer_discovery, run_main

DEFAULT_TRAINER = "nnUNetTrainer_vit"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-tr" not in argv:
        argv = ["-tr", DEFAULT_TRAINER, *argv]

    def predict() -> None:
        from nnunetv2.inference.predict_from_raw_data import predict_entry_point

        register_trainer_discovery()
        sys.argv = ["nnUNetv2_predict_vit.py", *argv]
        predict_entry_point()

    run_main("nnUNetv2_predict_vit.py", predict)


if __name__ == "__main__":
    main()
