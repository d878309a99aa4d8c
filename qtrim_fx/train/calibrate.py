"""``qtrim_fx.calibrate``: update site statistics from data, with no training side effects.

Under ``torch.distributed`` every rank calls ``calibrate`` with its own shard: each observer
update averages the ranks' quantiles (one all-reduce per site and batch), and the ranks agree
per batch on whether to go on (one more small all-reduce), so ranks with fewer batches, empty
batches or an earlier ``num_batches`` stop never leave the others waiting. The statistics are
identical on every rank afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.runtime.batches import call_model, run_batch
from qtrim_fx.runtime.nonfinite import nonfinite_counts, warn_nonfinite
from qtrim_fx.runtime.prepared import INFO_ATTR, iter_sites, require_prepared, unwrap
from qtrim_fx.train.bias_correction import correct_biases, reset_bias_shifts
from qtrim_fx.train.bn_check import watch_batchnorm

__all__ = ["calibrate", "call_model"]

_END = object()


def _check_batches(batches: Any, num_batches: Any) -> None:
    """Refuse what is not an iterable of batches (one tensor would be iterated sample by sample) and a
    ``num_batches`` that is not a positive int."""
    if isinstance(batches, torch.Tensor):
        raise ConfigError(f"calibrate takes an iterable of batches, got one tensor of shape {tuple(batches.shape)} (it "
                          "would be iterated sample by sample); pass [x] for one batch, or a list / DataLoader")
    if not isinstance(batches, Iterable):
        raise ConfigError(f"calibrate takes an iterable of batches (a list, a DataLoader), got "
                          f"{type(batches).__name__}; e.g. calibrate(qm, [x])")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ConfigError(f"calibrate num_batches={num_batches!r} must be a positive int (or None: every batch)")


def _is_empty(batch: Any) -> bool:
    first = batch
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    if isinstance(first, Mapping) and first:
        first = next(iter(first.values()))
    return isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0


@contextlib.contextmanager
def _calibration_mode(model: nn.Module, sync_ranks: bool, expected_batches: int | None = None) -> Iterator[list]:
    """Model in eval (dropout off, BN running stats frozen), sites observing with running means (and
    unclipped sites with running extremes)."""
    modes = {m: m.training for m in model.modules()}
    sites = [site for _, site, _ in iter_sites(model)]
    saved = [(s.observer.momentum, s.observer.update_every, s.observer._calls, s.observer.sync_ranks,
              s.observer.running_extremes) for s in sites]
    model.eval()
    for s in sites:
        s.train()
        s.observer.update_every = 1
        s.observer.sync_ranks = sync_ranks
        s.observer.running_extremes = True  # unclipped sites keep extremes, clipped "mse" sites pool their tails
        s.observer.start_pool(expected_batches)
    try:
        yield sites
    finally:
        for m, t in modes.items():
            m.training = t
        for s in sites:
            s.observer.start_pool()  # the pooled tails are a calibration's working state: freed
        for s, (mu, every, calls, sync, ext) in zip(sites, saved, strict=True):
            (s.observer.momentum, s.observer.update_every, s.observer._calls, s.observer.sync_ranks,
             s.observer.running_extremes) = (mu, every, calls, sync, ext)


def _expected_batches(batches: Iterable[Any], num_batches: int | None) -> int | None:
    """How many batches calibrate will run, when ``batches`` has a length or ``num_batches`` bounds it."""
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, num_batches)


def _agreed_batches(batches: Iterable[Any], num_batches: int | None, input_fn: Callable[[Any], Any] | None,
                    world: int, device: torch.device, warn: bool = True) -> Iterator[Any]:
    """The model inputs of ``batches`` to run, the same number on every rank: all stop with the first rank to run
    out (or at ``num_batches``); a batch empty on every rank is skipped, one empty on some ranks only is run."""
    it = iter(batches)
    used = 0
    while True:
        batch = _END if num_batches is not None and used >= num_batches else next(it, _END)
        have = batch is not _END
        if have and input_fn is not None:
            batch = input_fn(batch)
        empty = have and _is_empty(batch)
        everyone, any_data = _agree(have, not empty, world, device)
        if not everyone:
            return
        if not any_data:
            if warn:
                warnings.warn("calibrate: skipped an empty batch (batch size 0)", stacklevel=3)
            continue
        yield batch
        used += 1


def _world_size(distributed: bool) -> int:
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _agree(have: bool, nonempty: bool, world: int, device: torch.device) -> tuple[bool, bool]:
    """(every rank has a batch, some rank's batch is non-empty): one all-reduce of two numbers."""
    if world == 1:
        return have, nonempty
    flags = torch.tensor([float(have), float(have and nonempty)], device=device)
    dist.all_reduce(flags)
    everyone, any_data = flags.tolist()
    return everyone >= world, any_data > 0


def _device(model: nn.Module) -> torch.device:
    """Where this rank's flags live: the model's device (NCCL needs each rank's own GPU)."""
    device = next((t.device for t in model.buffers()), torch.device("cpu"))
    if device.type == "cpu" and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = False,
    distributed: bool = True,
    bias_correction: bool | None = None,
) -> int:
    """Set every site's statistics from ``batches`` (post-training quantization, or before training).

    Earlier statistics are replaced by the calibration set's own, however it is batched: a clipped
    activation site (the default ``"mse"`` rule) reads its tail nodes off every batch's values pooled
    (:mod:`qtrim_fx.runtime.pooled_tails`; under DDP the mean over the ranks of each rank's pooled nodes),
    sites that are never clipped (model outputs) take the min/max of the whole calibration set (of every
    rank's batches under DDP), and the other statistics (weights, the ``"quantile"`` rule) are the plain
    mean of the per-batch ones (the k-th batch enters each EMA with momentum 1/k).
    Dropout is off and BatchNorm running statistics are left untouched; gradients are not computed.
    A BatchNorm whose running variance does not describe the calibration data (off by more than 4×,
    channel median: a stale warm-up) is reported with a
    :class:`~qtrim_fx.train.bn_check.StaleBatchNormWarning`: ranges calibrated in eval mode through it
    will not fit train-mode activations.
    Empty batches are skipped. NaN/Inf values are left out of the statistics and reported
    (:class:`~qtrim_fx.runtime.nonfinite.NonFiniteWarning`, naming the sites).

    Bias correction (default, ``QuantConfig.bias_correction``): a second pass over the batches
    measures, layer by layer, the mean error each quantized Conv / Linear output channel has at λ = 1
    against the float model (λ = 0) and stores it as a shift of that layer's bias, applied as
    ``b − λ·δ`` in the prepared model and folded into the exported bias
    (:mod:`qtrim_fx.train.bias_correction`). It costs two more forward passes per batch: ``batches``
    is iterated again (a list, a DataLoader: a shuffling loader gives other batches of the same data,
    which is as good), except a one-shot iterator (a generator), whose batches are kept in memory as
    they are read. An earlier correction is replaced (or, with ``bias_correction=False``, removed).

    Args:
        model: a prepared model (or a ``DistributedDataParallel`` wrapper of one).
        batches: iterable of model inputs (tensor, tuple of positional inputs, or dict).
        num_batches: stop after this many batches.
        input_fn: maps each item of ``batches`` to model inputs (e.g. ``lambda b: b[0]`` for (x, y) pairs).
        progress: show a progress bar.
        distributed: when a ``torch.distributed`` process group is initialized, average the
            statistics over the ranks (every rank must call ``calibrate``; all stop with the rank
            that runs out of batches first). ``False``: this rank alone.
        bias_correction: measure and store the per-layer bias correction after the statistics;
            None (default): the model's ``QuantConfig.bias_correction`` (True, ``QuantConfig.paper()``: False).

    Returns:
        The number of batches used (the same on every rank).

    Raises:
        ValueError: no non-empty batch at all.
        TypeError: a batch that is not a tensor, tuple/list or dict (use ``input_fn``).
        ConfigError: (a ``ValueError``) the model fails on a batch: wrong shapes or dtypes, or (inputs,
            labels) pairs without ``input_fn`` (the model's own error is chained); ``batches`` that is one
            tensor or not iterable; a ``num_batches`` that is not a positive int.
    """
    model = unwrap(model)
    require_prepared(model, "calibrate")
    _check_batches(batches, num_batches)
    if bias_correction is None:
        config = getattr(getattr(model, INFO_ATTR, None), "config", None)
        bias_correction = bool(getattr(config, "bias_correction", True))
    elif not isinstance(bias_correction, bool):
        raise ConfigError(f"calibrate bias_correction={bias_correction!r} must be True, False or None (the config's)")
    # not tqdm.auto: its asyncio class calls iter() in __init__ (one more pass of a DataLoader's workers)
    from tqdm.autonotebook import tqdm

    world = _world_size(distributed)
    device = _device(model) if world > 1 else torch.device("cpu")
    before = nonfinite_counts(model)
    reset_bias_shifts(model)  # measured afresh below, from these statistics
    # The bias correction reads the batches a second time: a list, a DataLoader (anything ``iter`` does not
    # exhaust) is iterated again; a one-shot iterator (a generator) is kept in memory as it is read.
    keep = bias_correction and isinstance(batches, Iterator)
    ran: list[Any] = []
    used = 0
    with (_calibration_mode(model, world > 1, _expected_batches(batches, num_batches)) as sites,
          watch_batchnorm(model) as stale_bn,
          torch.no_grad()):
        shown = tqdm(batches, total=num_batches, disable=not progress, desc="calibrate", leave=False)
        for batch in _agreed_batches(shown, num_batches, input_fn, world, device):
            for s in sites:
                s.observer.momentum = 1.0 / (used + 1)
            # Under DDP a rank whose own batch is empty still runs it: its sites join the others' all-reduce.
            run_batch(model, batch, used, "calibrate", input_fn is not None)
            if keep:
                ran.append(batch)
            used += 1
    warn_nonfinite(before, nonfinite_counts(model), "during calibrate", stacklevel=3)
    if used == 0:
        raise ValueError(
            "calibrate got no (non-empty) batches (every batch had batch size 0, or batches was empty); pass at "
            "least one batch of model inputs, e.g. calibrate(qm, [x]) or calibrate(qm, loader, input_fn=lambda b: b[0])"
        )
    if not _warn_collapsed_ranges(model, stacklevel=3):  # the more specific of the two names the same cause
        stale_bn.warn(stacklevel=2)
    if bias_correction:
        again = ran if keep else _agreed_batches(batches, used, input_fn, world, device, warn=False)
        correct_biases(model, again, world, input_fn is not None, progress)
    return used


class CollapsedRangeWarning(UserWarning):
    """Calibrated activation ranges at the ε floor (see :func:`calibrate`)."""


def _warn_collapsed_ranges(model: nn.Module, stacklevel: int) -> bool:
    """Warn about activation sites whose calibrated range is at the ε floor of their scale, in a model
    whose BatchNorms were never trained; whether it warned.

    Eval-mode activations of ~1e-7 are what an untrained network with BatchNorm gives (its running
    variance is 1, whatever the activations are): scales derived from them clip training-mode
    activations to nothing, and training at λ > 0 from there diverges (the straight-through
    gradient passes the clipped values through BatchNorm's 1/sqrt(eps)). Constant tensors land
    here too, which is harmless, so this is a warning.
    """
    fresh_bn = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None
        and bool((m.running_var == 1).all()) and bool((m.running_mean == 0).all())
    ]
    if not fresh_bn:  # tiny ranges without untrained BatchNorms are constants or small init scales
        return False
    names: list[str] = []
    floor = 0.0
    for spec, site, _ in iter_sites(model):
        obs = site.observer
        if spec.kind != "activation" or not obs.initialized:
            continue
        lo, hi = obs.stats()
        if float((hi - lo).max()) <= 10 * site.eps:
            names.append(spec.name)
            floor = max(floor, 10 * site.eps)
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"calibrate: {len(names)} activation site(s) have a calibrated range below {floor:g} ({shown}), and "
            f"{len(fresh_bn)} BatchNorm layer(s) still hold their initial running statistics (mean 0, var 1: "
            f"{', '.join(fresh_bn[:3])}{' ...' if len(fresh_bn) > 3 else ''}). Calibration runs in eval mode, so "
            "these statistics do not describe the model's activations; their scales would clip training activations "
            "to nothing "
            "and training at λ > 0 from here diverges. Calibrate a trained model, or skip calibrate and let the "
            "curriculum's λ = 0 warm-up collect the statistics in training mode.",
            CollapsedRangeWarning,
            stacklevel=stacklevel,
        )
    return bool(names)
