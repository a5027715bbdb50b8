"""Overlay package: this repository's ``nnunetv2`` extends the installed upstream nnU-Net v2.

The upstream distribution's directory comes first in ``__path__`` so ``nnunetv2.training``,
``nnunetv2.inference`` etc. resolve to upstream, and upstream's own class discovery through
``nnunetv2.__path__[0]`` keeps working. This repository adds subpackages upstream does not have
(``model``, ``vit``, ``configs``). Nothing is installed over upstream's files.

In this repository's environment every Python imports this package as ``nnunetv2`` (``uv sync`` installs
``install/nnunet_vit.pth``), upstream's own commands and their workers included: importing it lets upstream find this
repository's normalization scheme and trainer (``nnunetv2/vit/upstream_adapter.py``).
"""

import importlib.metadata
import os

__path__ = [os.path.dirname(__file__)]

try:
    _upstream = importlib.metadata.distribution("nnunetv2")
except importlib.metadata.PackageNotFoundError:  # model layer only (e.g. a bare GPU box)
    _upstream = None
if _upstream is not None:
    _upstream_dir = os.path.dirname(str(_upstream.locate_file("nnunetv2/__init__.py")))
    if os.path.realpath(_upstream_dir) != os.path.realpath(__path__[0]):
        __path__.insert(0, _upstream_dir)
    # Every adaptation of upstream this package makes, each with its reason: nnunetv2/vit/upstream_adapter.py.
    from nnunetv2.vit.upstream_adapter import adapt_upstream

    adapt_upstream()

# A worker spawned by one of this repository's commands ends with it (see nnunetv2/vit/lifetime.py).
from nnunetv2.vit.lifetime import end_with_the_process_that_spawned_this  # noqa: E402

end_with_the_process_that_spawned_this()
