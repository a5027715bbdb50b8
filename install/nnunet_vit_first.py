"""Run at the start of every Python in this repository's environment (``nnunet_vit.pth``, installed by ``uv sync``).

Puts the repository ahead of site-packages on ``sys.path``, so that ``import nnunetv2`` anywhere in the environment,
upstream's own console scripts (``nnUNetv2_predict``, ``nnUNetv2_find_best_configuration``, ...) and their
spawned workers included, imports this repository's overlay: upstream's package with this one's subpackages, its
normalization scheme and its trainer registered (``nnunetv2/__init__.py``). As ``PYTHONPATH=<repository>`` would,
without having to set it. Nothing else is imported here.
"""

import os
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _put_repository_first() -> None:
    site_packages = [index for index, entry in enumerate(sys.path) if os.path.basename(entry) == "site-packages"]
    if REPOSITORY in sys.path[: site_packages[0] if site_packages else len(sys.path)]:
        return
    sys.path.insert(site_packages[0] if site_packages else 0, REPOSITORY)


_put_repository_first()
