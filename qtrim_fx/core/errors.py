"""Every error qtrim_fx raises, rooted at one :class:`QtrimError`.

::

    QtrimError
    ├── ConfigError (ValueError)        a scheme, config or argument that cannot be honoured
    │   ├── NoSitesError                 the model has nothing qtrim_fx can quantize
    │   └── CoverageError                weights left in float while QuantConfig(coverage="error")
    ├── CaptureError (ValueError)       neither front end could capture the model
    ├── CheckpointError (ValueError, RuntimeError)   a state from another model/config, or corrupted
    ├── ProfileError (ValueError)       a target profile that is unknown or contradicts itself
    ├── ExportError (ValueError)        a model that cannot be written as a clean QDQ file
    │   └── UncalibratedSitesError       sites without statistics
    ├── OutputPathError (ValueError)    an output path that is not a file qtrim_fx may replace
    │                                    (directory, FIFO, device, socket, read-only file)
    └── VerifyError (RuntimeError)      a verification that cannot be run as asked

Warnings derive from :class:`QtrimWarning` (a ``UserWarning``): :class:`CoverageWarning` (weights left
in float, at ``prepare``), :class:`TracedBranchWarning` (a data-dependent branch frozen by tracing).

``except qtrim_fx.QtrimError`` catches all of them; each is also the builtin exception callers
already catch (``ValueError`` for bad input, ``RuntimeError`` like ``nn.Module.load_state_dict``).
``SchemeError`` is the former name of :class:`ConfigError` and stays an alias of it.
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "CoverageError",
    "CoverageWarning",
    "ExportError",
    "NoSitesError",
    "OutputPathError",
    "ProfileError",
    "QtrimError",
    "QtrimWarning",
    "SchemeError",
    "TracedBranchWarning",
    "UncalibratedSitesError",
    "VerifyError",
]


class QtrimError(Exception):
    """Root of every error raised by qtrim_fx."""


class ConfigError(QtrimError, ValueError):
    """A quantization scheme, config or argument that cannot be honoured."""


#: Former name of :class:`ConfigError` (kept: ``except SchemeError`` still catches the same errors).
SchemeError = ConfigError


class NoSitesError(ConfigError):
    """The model has nothing qtrim_fx can quantize."""


class CoverageError(ConfigError):
    """Parameter-holding ops stay in float while the config asks for full coverage (``coverage="error"``)."""


class CaptureError(QtrimError, ValueError):
    """Neither symbolic tracing nor ``torch.export`` could capture the model."""


class CheckpointError(QtrimError, ValueError, RuntimeError):
    """A checkpoint that is corrupted or belongs to another model or config.

    Also a ``RuntimeError``, like the errors of ``nn.Module.load_state_dict``.
    """


class ProfileError(QtrimError, ValueError):
    """A target profile that is unknown or contradicts itself."""


class ExportError(QtrimError, ValueError):
    """A lowered model that cannot be exported as a clean QDQ graph for the requested target."""


class UncalibratedSitesError(ExportError):
    """Export was asked for a model whose sites have no statistics yet."""


class OutputPathError(QtrimError, ValueError):
    """An output path that is not a regular file qtrim_fx may replace, or a read-only one.

    Raised before anything is written by the writers of :mod:`qtrim_fx.core.fileio` (ONNX
    exports, checkpoints): a directory, FIFO, device or socket, a symlink loop, or a file whose
    mode forbids writing (checked on the mode bits, so root is refused too).
    """


class VerifyError(QtrimError, RuntimeError):
    """A verification run that cannot be carried out as asked (no backend, no inputs, ...)."""


class QtrimWarning(UserWarning):
    """Root of the warnings qtrim_fx issues about a model (``warnings.simplefilter("error", QtrimWarning)``)."""


class CoverageWarning(QtrimWarning):
    """Parameter-holding ops that ``prepare`` leaves in float (listed with the reason)."""


class TracedBranchWarning(QtrimWarning):
    """Tracing evaluated Python control flow on a tensor value: only the branch taken was captured."""
