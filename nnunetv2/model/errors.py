"""The model layer's errors: each message is one line naming the problem and its fix.

They live here, not in ``nnunetv2.vit.errors``, because the model layer runs without nnU-Net (it never imports
``nnunetv2.vit``); the integration layer re-exports them, so its commands know every user error from one module.
"""


class BackboneWeightsError(RuntimeError):
    """Backbone weights cannot be had: no download, a missing, unreadable or non-matching checkpoint file."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read: missing, corrupt, truncated or unreadable to this user."""


class UntrustedCheckpointError(Exception):
    """A checkpoint file holds objects beyond plain data; loading it could run code."""
