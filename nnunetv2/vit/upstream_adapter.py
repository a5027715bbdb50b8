"""Every adaptation of the installed upstream nnU-Net that this package makes, each with the reason it is needed.

``nnunetv2/__init__.py`` calls ``adapt_upstream`` on import, so it holds in every process that imports ``nnunetv2``
from this repository: this package's commands, upstream's own commands and the workers they spawn. Everything else
in ``nnunetv2.vit`` uses upstream through its public API (trainer hooks, ``nnUNetPredictor.manual_initialization``
and ``predict_from_files``). This module imports only upstream's normalization module and numpy.
"""

from __future__ import annotations

import os

from nnunetv2.preprocessing.normalization import default_normalization_schemes

from nnunetv2.vit.normalization import BackboneNormalization

TRAINER_FOLDER = os.path.join(os.path.dirname(__file__), "ext_trainers")  # what nnUNet_extTrainer lists for us


def adapt_upstream() -> None:
    """Let upstream find this package's normalization scheme and trainer by the names plans and commands give."""
    register_normalization()
    list_trainer_folder()


def register_normalization() -> None:
    """Make ``BackboneNormalization`` an attribute of upstream's ``default_normalization_schemes`` module.

    Why: upstream resolves a plan's ``normalization_schemes`` by class name only among the modules of its own
    ``preprocessing/normalization`` folder (``recursive_find_python_class``), in preprocessing and prediction workers
    alike, and has no setting that lists other folders (as ``nnUNet_extTrainer`` does for trainers).
    """
    default_normalization_schemes.BackboneNormalization = BackboneNormalization


def list_trainer_folder() -> None:
    """Append ``nnunetv2/vit/ext_trainers`` to ``nnUNet_extTrainer``, after the folders the user lists there.

    Why: upstream finds trainers outside its own folder only in the folders this variable lists; set here, upstream's
    commands (``nnUNetv2_predict``, ``nnUNetv2_find_best_configuration``) find nnUNetTrainer_vit without the user
    setting it, and spawned processes inherit it.
    """
    listed = [entry for entry in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if entry]
    if TRAINER_FOLDER not in listed:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*listed, TRAINER_FOLDER])


def find_trainer_class(name: str) -> type:
    """The trainer class called ``name``: ``nnUNetTrainer_vit`` or an imported subclass of it, else the class that
    upstream's ``recursive_find_trainer_class_by_name`` finds.

    Why: before importing an ``nnUNet_extTrainer`` folder's modules, upstream's lookup reads ``__file__`` and
    ``__path__`` of every module in ``sys.modules``. transformers 5.17 to 5.20 (5.20.2 is what uv.lock installs on
    Python 3.10; 5.24 no longer does) keeps alias modules there that import their target on that read, so the lookup
    fails ("dictionary changed size during iteration") in this package's commands, which have imported transformers
    by then. Upstream's own commands look trainers up before importing it.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    pending = [nnUNetTrainer_vit]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return recursive_find_trainer_class_by_name(name)
