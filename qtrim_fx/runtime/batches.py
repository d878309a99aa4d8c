"""Running a model on one batch of user data, and saying clearly when the data does not fit it.

Used wherever qtrim_fx feeds the user's batches or example inputs to a model (``calibrate``, ``prepare``'s
rank run): a batch is a tensor, a tuple / list of positional inputs or a dict of keyword inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qtrim_fx.core.errors import ConfigError, QtrimError

__all__ = ["call_model", "describe_batch", "run_batch"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"a calibration batch must be a tensor, a tuple/list of inputs or a dict of keyword inputs, got "
        f"{type(batch).__name__}; pass input_fn= to turn your batches into model inputs"
    )


def describe_batch(batch: Any) -> str:
    """``float32 (2, 3, 9, 9)`` for a tensor; the items of a tuple / list / dict the same way, one level deep."""
    def one(t: Any) -> str:
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else \
            type(t).__name__
    if isinstance(batch, Mapping):
        return "a dict {" + ", ".join(f"{k!r}: {one(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}: " + ", ".join(one(t) for t in batch)
    return one(batch)


def run_batch(model: nn.Module, batch: Any, index: int, caller: str, has_input_fn: bool) -> Any:
    """:func:`call_model`, with a failure of the model on the batch reported as the caller's input error.

    The model's own exception (a shape or dtype mismatch, a forward called with the wrong number of
    arguments) becomes a :class:`~qtrim_fx.core.errors.ConfigError` naming the batch, what it held and
    the fix, chained to the original; qtrim_fx's own errors and running out of memory pass unchanged.
    """
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        return call_model(model, batch)  # its TypeError names the batch kinds it takes
    try:
        return call_model(model, batch)
    except (QtrimError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        pairs = isinstance(batch, (tuple, list)) and len(batch) > 1 and not has_input_fn
        fix = ("it calls model(*batch) for a tuple or list, so (inputs, labels) pairs pass the labels as a second "
               "input: pass input_fn=lambda b: b[0] (or batches of inputs only)" if pairs else
               "pass batches the model's forward takes (a tensor, a tuple of positional inputs or a dict of keyword "
               "inputs, with the shapes and dtypes of your data), or input_fn= to turn your batches into them (if "
               "the float model runs on this batch, it is a qtrim_fx defect: please report it)")
        raise ConfigError(f"{caller}: the model does not run on batch {index} ({why}); the batch is "
                          f"{describe_batch(batch)}; {fix}") from e
