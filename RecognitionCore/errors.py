"""Errors a clinician or a batch script can act on.

Every failure that comes from the user's input or environment (not from a bug) is raised as one of these, with a
message that names the problem and what to do about it. The Widget shows ``str(error)``; the command line prints it.
"""


class RecognitionError(Exception):
    """Base class: the message is meant for the user, not for a developer."""


class InputError(RecognitionError):
    """The input data cannot be processed (missing file, not an image, 2D, empty, NaN, not a CT, ...)."""


class ModelError(RecognitionError):
    """A model cannot be resolved or loaded (unknown id, missing or corrupt weights, checksum mismatch, offline)."""


class Cancelled(RecognitionError):
    """The user cancelled a running operation; whatever was half-made has been discarded."""
