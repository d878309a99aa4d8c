"""``qtrim_fx.calibrate``: update site statistics from data, with no training side effects."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .prepare import _require_prepared, iter_sites

__all__ = ["calibrate", "call_model"]


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


def _is_empty(batch: Any) -> bool:
    first = batch
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    if isinstance(first, Mapping) and first:
        first = next(iter(first.values()))
    return isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[list]:
    """Model in eval (dropout off, BN running stats frozen), sites observing with running means."""
    modes = {m: m.training for m in model.modules()}
    sites = [site for _, site, _ in iter_sites(model)]
    saved = [(s.observer.momentum, s.observer.update_every, s.observer._calls) for s in sites]
    model.eval()
    for s in sites:
        s.train()
        s.observer.update_every = 1
    try:
        yield sites
    finally:
        for m, t in modes.items():
            m.training = t
        for s, (mu, every, calls) in zip(sites, saved, strict=True):
            s.observer.momentum, s.observer.update_every, s.observer._calls = mu, every, calls


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> int:
    """Set every site's statistics from ``batches`` (post-training quantization, or before training).

    The k-th batch enters each EMA with momentum 1/k, so the statistics are the plain mean
    of the per-batch quantiles over the calibration set (earlier statistics are replaced).
    Dropout is off and BatchNorm running statistics are left untouched; gradients are not computed.

    Args:
        model: a prepared model.
        batches: iterable of model inputs (tensor, tuple of positional inputs, or dict).
        num_batches: stop after this many batches.
        input_fn: maps each item of ``batches`` to model inputs (e.g. ``lambda b: b[0]`` for (x, y) pairs).
        progress: show a progress bar.

    Returns:
        The number of batches used.
    """
    _require_prepared(model, "calibrate")
    from tqdm.auto import tqdm

    used = 0
    with _calibration_mode(model) as sites, torch.no_grad():
        it = tqdm(batches, total=num_batches, disable=not progress, desc="calibrate", leave=False)
        for batch in it:
            if num_batches is not None and used >= num_batches:
                break
            batch = input_fn(batch) if input_fn is not None else batch
            if _is_empty(batch):
                warnings.warn("calibrate: skipped an empty batch (batch size 0)", stacklevel=2)
                continue
            for s in sites:
                s.observer.momentum = 1.0 / (used + 1)
            call_model(model, batch)
            used += 1
    if used == 0:
        raise ValueError("calibrate got no (non-empty) batches; pass at least one batch of model inputs")
    return used
