"""Bias correction (the second pass of :func:`qtrim_fx.calibrate`): remove each quantized layer's mean error.

Quantizing a Conv / Linear layer's weight and input leaves a per-output-channel *mean* error in its
output wherever the errors do not average out: an input that repeats one value over most positions
(a constant image background, the zeros a ReLU writes) is rounded the same way everywhere, and a ReLU
turns the noise of the layer before into a positive bias. The next layer sums such an error over its
whole receptive field coherently. Rounding noise cannot be removed, but its mean can: shift the
layer's bias by it (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, empirical variant).

For every layer with a :class:`~qtrim_fx.runtime.bias_shift.BiasShift`, in graph order and within one
forward pass per batch::

    δ_l = mean over batches, positions of ( y_l(quantized model, λ = 1, layers < l corrected) − y_l(float model) )

is measured per output channel and subtracted from ``y_l`` before the next layer reads it, so each
layer is corrected for what reaches it from the already-corrected layers before it (sequential, as the
layer-by-layer method, in one pass: a batch's own running estimate is applied). The float reference is
the same model at λ = 0 (exactly the float model) on the same batch. ``δ`` is stored in the BiasShift
modules and applied as ``b − λ·δ``. Under ``torch.distributed`` the per-batch sums are all-reduced, so
every rank stores the same ``δ``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from qtrim_fx.runtime.batches import run_batch
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR, BiasShift, bias_shifts
from qtrim_fx.runtime.prepared import blend_control

__all__ = ["correct_biases", "reset_bias_shifts"]

_PROBES = "_qtrim_bias_probes"


class _Probe(nn.Module):
    """Reads one layer's output: sums it per channel (float pass) or measures and removes its mean error."""

    def __init__(self, shift: BiasShift, world: int) -> None:
        super().__init__()
        object.__setattr__(self, "shift", shift)
        self.world = world
        self.mode = "float"
        self.float_sum: torch.Tensor | None = None
        self.err_sum: torch.Tensor | None = None
        self.count = 0.0
        self.failed = False

    def _axis(self, y: torch.Tensor) -> int | None:
        """The channel axis of this output, None when it has no such axis (then the layer is not corrected)."""
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or not y.is_floating_point():
            return None
        axis = self.shift.axis
        if axis == 1 and y.dim() == self.shift.rank - 1:  # an unbatched convolution: (C, *spatial)
            axis = 0
        if y.shape[axis % y.dim()] != self.shift.delta.numel():
            return None
        return axis % y.dim()

    def _sums(self, y: torch.Tensor, axis: int) -> tuple[torch.Tensor, float]:
        dims = [d for d in range(y.dim()) if d != axis]
        c = y.shape[axis]
        return y.sum(dim=dims, dtype=torch.float64) if dims else y.double(), float(y.numel() // max(c, 1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        axis = self._axis(y)
        if axis is None or self.failed:
            self.failed = True  # every rank sees the same shapes: none of them all-reduces for this layer
            return y
        s, n = self._sums(y, axis)
        if self.mode == "float":
            self.float_sum = s
            return y
        local = torch.cat([s - self.float_sum, torch.tensor([n], dtype=torch.float64, device=s.device)])
        if self.world > 1:
            dist.all_reduce(local)
        self.err_sum = local[:-1] if self.err_sum is None else self.err_sum + local[:-1]
        self.count += float(local[-1])
        if self.count == 0:
            return y
        delta = (self.err_sum / self.count).to(y.dtype)
        shape = [1] * y.dim()
        shape[axis] = -1
        return y - delta.view(shape)

    def delta(self) -> torch.Tensor | None:
        if self.failed or self.err_sum is None or self.count == 0:
            return None
        return (self.err_sum / self.count).float()


def reset_bias_shifts(model: nn.Module) -> None:
    """Clear every stored correction (a new calibration measures them afresh)."""
    for m in bias_shifts(model).values():
        m.set_delta(None)


@contextlib.contextmanager
def _probed(gm: fx.GraphModule, world: int) -> Iterator[list[_Probe]]:
    """A probe after every layer whose bias goes through a BiasShift; the graph is restored afterwards."""
    probes: list[_Probe] = []
    nodes: list[fx.Node] = []
    holder = nn.ModuleList()
    gm.add_module(_PROBES, holder)
    try:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not str(node.target).startswith(BIAS_SHIFT_ATTR + "."):
                continue
            shift = gm.get_submodule(str(node.target))
            for layer in list(node.users):
                probe = _Probe(shift, world)
                holder.append(probe)
                with gm.graph.inserting_after(layer):
                    p = gm.graph.call_module(f"{_PROBES}.{len(holder) - 1}", (layer,))
                layer.replace_all_uses_with(p, delete_user_cb=lambda u, p=p: u is not p)
                probes.append(probe)
                nodes.append(p)
        gm.recompile()
        yield probes
    finally:
        for p in nodes:
            p.replace_all_uses_with(p.args[0])
            gm.graph.erase_node(p)
        delattr(gm, _PROBES)
        gm.recompile()


def correct_biases(model: fx.GraphModule, batches: Iterable[Any], world: int, has_input_fn: bool,
                   progress: bool = False) -> int:
    """Measure and store every BiasShift's ``δ`` from ``batches`` (see module doc); the number of layers corrected.

    ``model`` is the unwrapped prepared model, already calibrated; its mode, λ and site statistics are left
    as they were. Every rank passes the same number of batches (``calibrate`` agrees on them).
    """
    shifts = bias_shifts(model)
    if not shifts:
        return 0
    # not tqdm.auto: its asyncio class calls iter() in __init__ (one more pass of a DataLoader's workers)
    from tqdm.autonotebook import tqdm

    reset_bias_shifts(model)
    control = blend_control(model)
    lam = control.get()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _probed(model, world) as probes, torch.no_grad():
            for i, batch in enumerate(tqdm(batches, disable=not progress, desc="bias correction", leave=False)):
                for p in probes:
                    p.mode = "float"
                control.set(0.0)
                run_batch(model, batch, i, "calibrate", has_input_fn)
                for p in probes:
                    p.mode = "quant"
                control.set(1.0)
                run_batch(model, batch, i, "calibrate", has_input_fn)
            deltas = [(p.shift, p.delta()) for p in probes]
    finally:
        control.set(lam)
        for m, t in modes.items():
            m.training = t
    skipped = []
    done = 0
    for shift, delta in deltas:
        if delta is None:
            continue
        if not bool(torch.isfinite(delta).all()):
            skipped.append(shift)
            continue
        shift.set_delta(delta)
        done += 1
    if skipped:
        names = [k for k, m in shifts.items() if m in skipped]
        warnings.warn(f"calibrate: bias correction skipped {len(names)} layer(s) whose outputs were not finite on the "
                      f"calibration batches ({', '.join(names[:5])})", stacklevel=3)
    return done
