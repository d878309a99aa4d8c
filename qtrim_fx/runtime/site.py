"""A quantization site: one observer + one blend-quant on one tensor.

Every site of a prepared model is a :class:`QuantSite` module called from the
FX graph (``call_module``). It records statistics in training, derives qparams
from them for its scheme, and blends the tensor towards its fake-quantized
value by the model's single global λ (:class:`qtrim_fx.runtime.blend.BlendControl`).

Per training step a site costs, in eager mode: one observer update (on a subsample,
every ``update_every`` calls), qparams derived only when the statistics changed
(they are cached against the statistic tensors' identity and version counters, so
frozen statistics cost no kernels; the clipped-STE bounds are cached with them), and one
blend-quant (one allocation, in-place passes, no lerp at λ = 1). At λ = 1 on a grid whose lower
end is 0, a site reading a ``deferred_relu`` output quantizes the ReLU's input itself (same values and
gradient; the ReLU's pass, its mask and their allocations are skipped, see
:func:`qtrim_fx.runtime.ops.deferred_relu`). Nothing reads a tensor back to the host. Under
``torch.compile`` the whole site is traced without graph breaks; the observer update
is one opaque op in the graph (see ``qtrim_fx.runtime.observer``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from qtrim_fx.core.fakequant import derive_qparams
from qtrim_fx.core.scheme import QuantScheme
from qtrim_fx.runtime.blend import (
    BlendControl,
    BlendQuantFn,
    blend_quant_folded,
    fold_product,
    host_bounds,
    quantize_folded_one,
    quantize_owned_,
)
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.ops import channel_shape, is_deferred_relu, relu_now

__all__ = ["QuantSite"]

SiteKind = Literal["weight", "activation"]


class QuantSite(nn.Module):
    """Observer + blend-quant at one tensor of a prepared model.

    Args:
        scheme: the training-time integer grid (export may derive others from the same stats).
        observer: the statistics of this tensor.
        control: the model's shared :class:`BlendControl` (held by reference, not registered,
            so λ is stored once, on the prepared model's root).
        kind: ``"weight"`` or ``"activation"``.
        eps: lower bound of derived scales.
    """

    #: Backward recomputes the saturation mask from the saved output (no memory of its own: the
    #: reader saves it too). ``InsertSitesPass`` sets ``False`` where a reader modifies the output
    #: in place; the site then saves a 1-byte mask. Safe default for sites built by hand.
    keep_output: bool = False
    #: A model output (``SiteSpec.model_output``) left float: observed (an integer-only export still
    #: needs its range) but never quantized, in training and in the files of float-capable targets.
    float_output: bool = False
    #: Set by ``InPlaceSitesPass`` where this site is the only reader of a fresh tensor that nothing keeps:
    #: at λ = 1 (eager, float32, no hooks that could hold it) the site quantizes it in place.
    overwrite_input: bool = False
    _input_module: nn.Module | None = None  # the module computing that tensor (its hooks are checked), if any

    def __init__(
        self,
        scheme: QuantScheme,
        observer: EmaQuantileObserver,
        control: BlendControl,
        kind: SiteKind = "activation",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer = observer
        self.kind = kind
        self.eps = float(eps)
        self.enabled = True
        object.__setattr__(self, "_control", control)
        self._warned_unobserved = False

    @property
    def control(self) -> BlendControl:
        return self._control  # type: ignore[return-value]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A deferred relu is the ReLU's *input* (see qtrim_fx.runtime.ops.deferred_relu): hooks on this site,
        # or global module hooks, must see what the graph means, relu's output. Without hooks forward decides.
        if (args and not torch.compiler.is_compiling() and isinstance(args[0], torch.Tensor)
                and is_deferred_relu(args[0]) and _hooked(self)):
            args = (relu_now(args[0]), *args[1:])
        return super().__call__(*args, **kwargs)

    def bind(self, control: BlendControl) -> None:
        object.__setattr__(self, "_control", control)

    def qparams(self, scheme: QuantScheme | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``scheme`` (default: the training scheme) from the stored stats."""
        lo, hi = self.observer.stats()
        return derive_qparams(scheme or self.scheme, lo, hi, self.eps)

    def _training_qparams(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training-scheme (scale, zero point) shaped to broadcast against an ``ndim``-D tensor (see :meth:`_training_grid`)."""
        scale, zp, _ = self._training_grid(ndim)
        return scale, zp

    def _training_grid(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[float, float] | None]:
        """Training-scheme (scale, zero point, host bounds) shaped to broadcast against an ``ndim``-D tensor.

        ``None`` for the zero point of a symmetric signed grid (z = 0). The host bounds are the
        clipped-STE mask's ``(lo, hi)`` (:func:`~qtrim_fx.runtime.blend.host_bounds`; None unless
        per-tensor float32 CPU qparams). Cached in eager mode until the statistics tensors change
        (identity and in-place version counters: an observer update, ``load_state_dict``, ``.to()``),
        so frozen statistics cost no kernels and no host reads per step.
        """
        obs = self.observer
        buffers = obs._buffers
        lo, hi = buffers["lo"], buffers["hi"]
        key = None
        # Not cached under inference mode: its tensors cannot be saved for backward by a later training step.
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
            cached = self.__dict__.get("_qp_cache")
            if cached is not None and _still_valid(cached[0], lo, hi, self.scheme, self.eps, ndim):
                return cached[1], cached[2], cached[3]
            key = _stats_key(lo, hi, self.scheme, self.eps, ndim)
        s = self.scheme
        with torch.no_grad():
            scale, zp = self.qparams()
            if s.axis is not None:
                scale, zp = channel_shape(scale, ndim, s.axis), channel_shape(zp, ndim, s.axis)
        zp_or_none = None if (s.symmetric and s.signed) else zp
        if key is None:
            return scale, zp_or_none, None
        bounds = host_bounds(scale, zp_or_none, s.qmin, s.qmax)
        self.__dict__["_qp_cache"] = (key, scale, zp_or_none, bounds)
        return scale, zp_or_none, bounds

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_qp_cache", None)  # derived, device-bound: rebuilt on first use
        return state

    def forward(self, x: torch.Tensor, fold: torch.Tensor | None = None) -> torch.Tensor:
        """Observe ``x`` (train mode) and blend it towards its fake-quantized value by λ.

        Args:
            x: the tensor of this site.
            fold: for a conv weight followed by BatchNorm, the per-output-channel factor
                γ/sqrt(var + eps): the site then observes and quantizes the folded weight
                ``x·fold`` (the one that is deployed) and returns ``Q(x·fold)/fold`` blended with ``x``.
        """
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        compiling = torch.compiler.is_compiling()
        # A deferred relu (see qtrim_fx.runtime.ops.deferred_relu): x is relu's input; every path but the
        # λ = 1 fast path below applies the relu first.
        deferred = fold is None and not compiling and is_deferred_relu(x)
        control = self._control
        obs = self.observer  # one nn.Module attribute lookup (this runs for every site on every step)
        # λ = 0 in eager: FP32 exactly, no quantization work (the statistics still update).
        quantize = self.enabled and not self.float_output and (compiling or not control._is_zero)
        observe = self.training and obs.training and obs.enabled
        if fold is not None and quantize and control._is_one and not compiling:
            out = self._folded_one(x, fold, observe)
            if out is not None:
                return out
        if not (quantize or observe):
            return relu_now(x) if deferred else x
        f = xs = None
        if fold is not None:
            fd = fold.detach()  # detached: the cast and view below record no autograd
            f = channel_shape(fd if fd.dtype == x.dtype else fd.to(x.dtype), x.dim(), 0)
            xs = fold_product(x if quantize else x.detach(), f)  # see fold_product: it may carry x's gradient
        if observe:
            d = obs.__dict__
            if not compiling and d["_calls"] % d["update_every"] and not (obs._forward_pre_hooks or obs._forward_hooks):
                d["_calls"] += 1  # a call the observer only counts (EmaQuantileObserver.forward): no module call
            elif deferred and obs.reads_next_call():
                obs(torch.relu(x.detach()))
            else:
                obs(x if xs is None else xs)
        if not quantize:
            return relu_now(x) if deferred else x
        if not obs._initialized:
            if not self._warned_unobserved:
                warnings.warn(
                    f"quantization site {self.observer_name()} has no statistics yet and is left in "
                    "float; run qtrim_fx.calibrate(model, batches) or train before raising λ",
                    stacklevel=2,
                )
                self._warned_unobserved = True
            return relu_now(x) if deferred else x
        scale, zp, bounds = self._training_grid(x.dim())
        s = self.scheme
        # The host-side mirror of λ = 1 lets eager skip the lerp; compiled graphs keep it (no guard on λ).
        one = control._is_one and not compiling
        if f is None:
            # Q(relu(x)) == Q(x) and the clipped STE masks x̃ <= 0 on a grid starting at 0, at λ = 1.
            if deferred and not (one and obs.clip and bounds is not None and bounds[0] == 0.0):
                x, deferred = relu_now(x), False
            overwrite = (self.overwrite_input and one and x.dtype == torch.float32 and not _hooked(self)
                         and not (self._input_module is not None and _hooked(self._input_module)))
            if overwrite and self.keep_output and obs.clip and bounds is not None:
                # The lean in-place path (quantize_owned_). A view (a deferred relu's; a Linear's output on 3-D
                # input, a view of its 2-D product) is written through its base, which nothing else reads
                # (InPlaceSitesPass), when that base holds exactly the view's elements in the same layout.
                target = _owned_storage(x, deferred) if x._is_view() else x
                if target is not None:
                    out = quantize_owned_(target, scale, bounds)
                    return out if out.shape == x.shape else out.view(x.shape)
            if overwrite and x._is_view():
                overwrite = False
            out = BlendQuantFn.apply(x, scale, zp, control.value, s.qmin, s.qmax, one, self.keep_output, obs.clip,
                                     bounds, overwrite)
            if not one and (obs.softmax_dim is not None or obs.mask_operand is not None):
                # An attention mask's -inf: lerp(-inf, lo, λ) is NaN below λ = 1/2; the blend of a masked
                # entry is -inf for every λ < 1 (masked, as in float), the grid's bound at λ = 1. Compiled
                # graphs know λ only as a tensor (no guard on it) and always lerp, which is NaN at an infinite x
                # for λ = 1 too: there the value is chosen on the tensor, the grid's end at λ = 1.
                masked = x
                if compiling:
                    z: Any = 0.0 if zp is None else zp
                    end = torch.where(x > 0, (s.qmax - z) * scale, (s.qmin - z) * scale).to(x.dtype)
                    masked = torch.where(control.value < 1.0, x, end)
                out = torch.where(torch.isinf(x), masked, out)
            return out
        return blend_quant_folded(x, xs, f, scale, zp, control.value, s.qmin, s.qmax, one)

    def _folded_one(self, x: torch.Tensor, fold: torch.Tensor, observe: bool) -> torch.Tensor | None:
        """The eager λ = 1 training step of a BN-folded float32 CPU weight on a symmetric grid, or None.

        :func:`~qtrim_fx.runtime.blend.quantize_folded_one` (the bits of the generic path below) when the
        statistics do not change on this call (frozen, or a call the observer only counts) and the cached grid is
        current; None sends every other case (an observer update, first use, a zero point, another dtype or device,
        no gradient, inference mode) to the generic path, which this skips nothing of.
        """
        if (x.dtype is not torch.float32 or fold.dtype is not torch.float32 or fold.requires_grad or fold.dim() != 1
                or not x.requires_grad or not (x.is_cpu and fold.is_cpu)
                or not torch.is_grad_enabled() or torch.is_inference_mode_enabled()):
            return None
        obs = self.observer
        if not obs._initialized:
            return None
        cached = self.__dict__.get("_qp_cache")
        buffers = obs._buffers
        if (cached is None or cached[2] is not None
                or not _still_valid(cached[0], buffers["lo"], buffers["hi"], self.scheme, self.eps, x.dim())):
            return None
        if observe:
            d = obs.__dict__
            if not d["_calls"] % d["update_every"] or obs._forward_pre_hooks or obs._forward_hooks:
                return None  # this call updates the statistics (or a hook sees it): the generic path
            d["_calls"] += 1  # a call the observer only counts (EmaQuantileObserver.forward)
        s = self.scheme
        return quantize_folded_one(x, fold, cached[1], s.qmin, s.qmax)

    def observer_name(self) -> str:
        return getattr(self, "_qtrim_name", self.__class__.__name__)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.scheme.describe()}"


_MODULE_STATE = torch.nn.modules.module
_GLOBAL_HOOKS = tuple(getattr(_MODULE_STATE, name, {}) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"))


#: Autograd nodes of the matrix products whose output a Linear / matmul on 3-D input reshapes into a view.
_PRODUCT_NODES = frozenset({"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0"})


def _owned_storage(view: torch.Tensor, deferred: bool) -> torch.Tensor | None:
    """The base of ``view`` if it holds exactly the view's elements, laid out alike (not itself a view), else None.

    Only a deferred ReLU's base (its input, read by nothing else: InPlaceSitesPass) or a matrix product's fresh
    result (a Linear / matmul on 3-D input returns a view of it): never the base of a view of anything else.
    """
    base = view._base
    if base is None or base._is_view() or base.numel() != view.numel() or base.dtype != view.dtype:
        return None
    if not deferred and type(base.grad_fn).__name__ not in _PRODUCT_NODES:
        return None
    if base.storage_offset() != view.storage_offset():
        return None
    same = base.shape == view.shape and base.stride() == view.stride()
    return base if same or (base.is_contiguous() and view.is_contiguous()) else None


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` runs any module hook (its own or a global one) that sees its arguments."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
                or any(_GLOBAL_HOOKS))


def _stats_key(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, eps: float, ndim: int) -> tuple | None:
    try:
        # The tensors themselves (not their ids) are kept, so an id cannot be reused while cached.
        return (lo, lo._version, hi, hi._version, scheme, eps, ndim)
    except RuntimeError:  # inference-mode tensors have no version counter: do not cache
        return None


def _still_valid(key: tuple, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, eps: float, ndim: int) -> bool:
    """Whether a cached :func:`_stats_key` still describes these statistics (checked on every call, so without
    building the current key). The scheme by identity first (a frozen dataclass's == compares every field)."""
    if key[0] is not lo or key[2] is not hi or key[6] != ndim or key[5] != eps:
        return False
    try:
        if key[1] != lo._version or key[3] != hi._version:
            return False
    except RuntimeError:  # an inference-mode tensor: no version counter
        return False
    return key[4] is scheme or key[4] == scheme
