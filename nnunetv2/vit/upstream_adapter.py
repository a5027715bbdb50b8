"""Every adaptation of the installed upstream nnU-Net that this package makes, each with its reason.

``nnunetv2/__init__.py`` calls ``adapt_upstream`` on import, so it holds in every process that imports ``nnunetv2``:
our commands, upstream's and their workers. Everything else uses upstream's public API.
"""

from __future__ import annotations

import os

from nnunetv2.preprocessing.normalization import default_normalization_schemes

from nnunetv2.vit.normalization import BackboneNormalization

TRAINER_FOLDER = os.path.join(os.path.dirname(__file__), "ext_trainers")  # what nnUNet_extTrainer lists for us


def adapt_upstream() -> None:
    """Let upstream find this package's normalization scheme and trainer by the names plans and commands give."""
    # Upstream finds schemes by name only in its own default_normalization_schemes module; no setting lists others.
    default_normalization_schemes.BackboneNormalization = BackboneNormalization
    # Upstream's commands (nnUNetv2_predict, nnUNetv2_find_best_configuration) and their workers look for trainers in
    # nnUNet_extTrainer too: ext_trainers goes after the user's folders.
    listed = [entry for entry in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if entry]
    if TRAINER_FOLDER not in listed:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*listed, TRAINER_FOLDER])


def find_trainer_class(name: str) -> type:
    """``nnUNetTrainer_vit`` or an imported subclass called ``name``, else upstream's lookup. Why: upstream's lookup
    reads ``__path__`` of every loaded module, which imports transformers 5.17-5.20's alias modules and fails
    ("dictionary changed size during iteration") once transformers is imported, as in our commands."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    pending = [nnUNetTrainer_vit]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return recursive_find_trainer_class_by_name(name)
