"""What to quantize and how: :class:`QuantConfig` with per-layer overrides.

Grids follow the paper: INT8 symmetric per-channel weights, UINT8 asymmetric per-tensor
activations. Statistics: by default a weight's range is its EMA'd exact max |w| per channel
(``weight_range="max"``: 8-bit grids lose more to clipping the largest weights than they gain in
resolution; reverse pruning clips the weights themselves, so after a pin max |w| is the pruning
level); each activation site's range is the one of least expected quantization error for its grid,
chosen from EMA'd tail order statistics (``act_range="mse"``: rounding noise s²/12 against the
clipping error of the tails, :mod:`qtrim_fx.runtime.range_rule`; one-signed tensors such as ReLU
outputs keep their max), model outputs (sites that feed no other site and no weighted op) stay float
unless the target is integer-only, and are never clipped there (their range is the EMA'd min/max;
``calibrate`` takes the calibration set's), and statistics update every
:data:`DEFAULT_UPDATE_EVERY` training steps with the momentum compensated (μ_N = 1 − (1 − μ)^N,
the paper's horizon of 1/μ steps). μ = 1e-3, subsamples of at most 1e5 elements.

The paper's exact recipe is :meth:`QuantConfig.paper` (fixed p_lo = 0.001 / p_hi = 0.999 quantiles
for every activation, the p_hi |w| quantile for weights, updated every step); giving ``p_lo``/``p_hi``
explicitly also selects the quantile rules (``act_range="quantile"``, ``weight_range="quantile"``).

Overrides are matched in order, the last match winning, against a site's owning
module name (regex, ``re.fullmatch``), its module type and its op kind::

    QuantConfig(weight_bits=4, overrides=(
        Override(name=r"conv1|fc", weight_bits=8),       # first/last layer stay 8 bit
        Override(name=r"layer4\\..*", exclude=True),      # leave a block in float
        Override(op="conv_transpose", weight_per_channel=False),
    ))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import get_args

from torch import nn

from qtrim_fx.core.scheme import QuantScheme, SchemeError
from qtrim_fx.core.spec import OpKind

__all__ = ["DEFAULT_UPDATE_EVERY", "EPS_MAX", "EPS_MIN", "Override", "QuantConfig", "SiteSettings"]

#: Statistics cadence of the defaults: every 4th training step (μ compensated, so the EMA horizon in
#: steps is the paper's); ``QuantConfig.paper()`` and ``update_every=1`` update every step.
DEFAULT_UPDATE_EVERY = 4
#: The paper's quantile levels (the quantile rule's pair; the tail base of the MSE rule).
PAPER_P_LO = 0.001
PAPER_P_HI = 0.999
ACT_RANGES = ("mse", "quantile")
WEIGHT_RANGES = ("max", "quantile")

#: Bounds of :attr:`QuantConfig.eps`, the floor of a statistic's range (``scale = max(range, eps) / levels``,
#: in float32). Above 1e-2 the floor reaches real ranges (|w| quantiles of wide layers are ~1e-2) and
#: silently replaces them. The lower bound keeps ``eps / levels`` (up to 65535 levels at 16 bits) well above
#: float32's smallest normal (1.2e-38): a floor that rounds to 0 gives NaN for constant tensors (0 / 0).
EPS_MIN = 1e-30
EPS_MAX = 1e-2


@dataclass(frozen=True)
class SiteSettings:
    """The resolved settings of one site (after overrides)."""

    weight_bits: int
    weight_per_channel: bool
    act_bits: int
    act_signed: bool
    act_symmetric: bool
    exclude: bool

    def weight_scheme(self, channel_axis: int | None) -> QuantScheme:
        axis = channel_axis if self.weight_per_channel else None
        return QuantScheme(bits=self.weight_bits, signed=True, symmetric=True, axis=axis, narrow=True)

    def act_scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.act_bits, signed=self.act_signed, symmetric=self.act_symmetric)


#: The op kinds an ``Override(op=...)`` may name (what ``NormalizeOpsPass`` tags nodes with).
_OP_KINDS = frozenset(get_args(OpKind))


@dataclass(frozen=True)
class Override:
    """Settings for the sites matching ``name`` (regex), ``module_type`` and ``op`` (all given must match).

    Any field left ``None`` keeps the value from the base config (or an earlier override).
    """

    name: str | None = None
    module_type: type[nn.Module] | tuple[type[nn.Module], ...] | None = None
    op: str | None = None
    weight_bits: int | None = None
    weight_per_channel: bool | None = None
    act_bits: int | None = None
    act_signed: bool | None = None
    act_symmetric: bool | None = None
    exclude: bool | None = None

    def __post_init__(self) -> None:
        if self.name is None and self.module_type is None and self.op is None:
            raise SchemeError("Override needs at least one of name=, module_type= or op= to match sites")
        if self.name is not None:
            if not isinstance(self.name, str):
                raise SchemeError(f"Override name={self.name!r} must be a regex string over qualified module names, "
                                  "e.g. name=r\"layer4\\..*\"")
            try:
                re.compile(self.name)
            except re.error as e:
                raise SchemeError(f"Override name={self.name!r} is not a valid regex: {e}") from e
        if self.module_type is not None:
            kinds = self.module_type if isinstance(self.module_type, tuple) else (self.module_type,)
            if not kinds or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in kinds):
                raise SchemeError(f"Override module_type={self.module_type!r} must be an nn.Module class or a tuple "
                                  "of them, e.g. module_type=torch.nn.Linear (the class, not its name)")
        if self.op is not None and self.op not in _OP_KINDS:
            raise SchemeError(f"Override op={self.op!r} is not an op kind; use one of {', '.join(sorted(_OP_KINDS))}")

    def matches(self, module: str | None, module_type: type | None, op: str) -> bool:
        if self.name is not None and (module is None or re.fullmatch(self.name, module) is None):
            return False
        if self.module_type is not None and (module_type is None or not issubclass(module_type, self.module_type)):
            return False
        return self.op is None or self.op == op


_OVERRIDABLE = ("weight_bits", "weight_per_channel", "act_bits", "act_signed", "act_symmetric", "exclude")


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings for :func:`qtrim_fx.prepare`.

    Args:
        weight_bits: weight integer width (8 = INT8, 4 = INT4), symmetric, signed.
        weight_per_channel: one scale per output channel (else per tensor).
        act_bits, act_signed, act_symmetric: activation grid (default UINT8 asymmetric). ``act_signed`` /
            ``act_symmetric`` left None take the ``target``'s grid (``tensorrt``: INT8 symmetric, ``npu``:
            INT8 asymmetric), so the model trains on the grid the target deploys; False without a target.
        p_lo, p_hi: activation quantile levels (default 0.001 / 0.999); ``p_hi`` is also the |w|
            quantile of weights. Given explicitly (and ``act_range`` not), they select the paper's
            quantile rule; under ``act_range="mse"`` they are where the stored tails begin.
        act_range: how an activation site's range is derived: ``"mse"`` (default: least expected
            quantization error for its grid, from EMA'd tail nodes between the p_lo/p_hi quantiles and
            the min/max; graph outputs take the EMA'd min/max) or ``"quantile"`` (the paper:
            ``[lo, hi]`` = the EMA'd p_lo/p_hi quantiles).
        weight_range: how a weight site's range is derived: ``"max"`` (default: the EMA'd exact max |w|,
            per channel or per tensor) or ``"quantile"`` (the paper: the EMA'd ``p_hi`` quantile of |w|;
            the default when ``p_lo``/``p_hi`` are given or ``act_range="quantile"``).
        momentum: EMA momentum μ of the statistics, per training step (an update every N steps uses
            1 − (1 − μ)^N, so the horizon in steps does not depend on ``update_every``).
        max_samples: subsample bound S_max of each quantile.
        eps: lower bound ε of the range a scale is derived from, in [1e-30, 1e-2].
        update_every: update statistics every N training steps (default
            :data:`DEFAULT_UPDATE_EVERY`; 1 = every step, as the paper).
        seed: base seed of the observers' subsampling.
        quantize_inputs: quantize model inputs that feed weighted ops.
        overrides: per-site :class:`Override` rules (last match wins).
        coverage: what ``prepare`` does about weights of parameter-holding ops left in float
            (leaf modules, unsupported ops, exclusions): ``"warn"`` (default), ``"error"``, ``"ignore"``.
        target: a target profile name (``"qnn"``, ``"npu"``, ...) whose ``activation_sites`` are
            trained as well: an integer-only back end then gets every tensor it computes on
            quantized (no float islands). ``None`` (default): the hardware-neutral sites, which
            export to every target.
        bias_correction: ``calibrate`` also removes the mean quantization error of each quantized
            Conv / Linear output channel by shifting that layer's bias (layer by layer, measured against the
            float model on the calibration batches; see :func:`qtrim_fx.calibrate`). Default True;
            ``QuantConfig.paper()`` turns it off (the paper has no such step).
    """

    weight_bits: int = 8
    weight_per_channel: bool = True
    act_bits: int = 8
    act_signed: bool | None = None
    act_symmetric: bool | None = None
    p_lo: float | None = None
    p_hi: float | None = None
    momentum: float = 1e-3
    max_samples: int = 100_000
    eps: float = 1e-6
    update_every: int = DEFAULT_UPDATE_EVERY
    seed: int = 0
    quantize_inputs: bool = True
    overrides: tuple[Override, ...] = field(default=())
    #: parameter-holding ops left in float at prepare: "warn" (one CoverageWarning), "error"
    #: (CoverageError listing them) or "ignore"; they are listed by ``inspect`` in any case
    coverage: str = "warn"
    act_range: str | None = None
    target: str | None = None
    weight_range: str | None = None
    bias_correction: bool = True

    @classmethod
    def paper(cls, **changes: object) -> QuantConfig:
        """The paper's exact statistics recipe: fixed p_lo = 0.001 / p_hi = 0.999 quantiles for every
        activation (quantized model outputs included: on integer-only targets), updated every training
        step with μ = 1e-3, and no bias correction in ``calibrate``.

        Args:
            changes: other fields (grids, overrides, ...), as for ``QuantConfig(...)``.
        """
        base: dict[str, object] = {"p_lo": PAPER_P_LO, "p_hi": PAPER_P_HI, "act_range": "quantile",
                                   "weight_range": "quantile", "update_every": 1, "momentum": 1e-3,
                                   "bias_correction": False}
        return cls(**{**base, **changes})

    def _resolve_range_rule(self) -> None:
        """Fill in ``act_range``/``weight_range`` (explicit quantiles mean the paper's rules) and the levels."""
        explicit = self.p_lo is not None or self.p_hi is not None
        rule = self.act_range
        if rule is None:
            rule = "quantile" if explicit else "mse"
        if rule not in ACT_RANGES:
            raise SchemeError(f"QuantConfig act_range={rule!r} must be 'mse' (default: least quantization error "
                              "per activation) or 'quantile' (the paper's fixed p_lo/p_hi quantiles)")
        w_rule = self.weight_range
        if w_rule is None:
            w_rule = "quantile" if explicit or self.act_range == "quantile" else "max"
        if w_rule not in WEIGHT_RANGES:
            raise SchemeError(f"QuantConfig weight_range={w_rule!r} must be 'max' (default: the exact max |w| per "
                              "channel) or 'quantile' (the paper's p_hi quantile of |w|)")
        object.__setattr__(self, "act_range", rule)
        object.__setattr__(self, "weight_range", w_rule)
        if self.p_lo is None:
            object.__setattr__(self, "p_lo", PAPER_P_LO)
        if self.p_hi is None:
            object.__setattr__(self, "p_hi", PAPER_P_HI)

    def _resolve_target(self) -> None:
        """``target`` as its registered profile name (aliases resolved); unknown names are refused."""
        if self.target is None:
            return
        from qtrim_fx.core.errors import ProfileError
        from qtrim_fx.core.profiles import get_profile

        if not isinstance(self.target, str):
            raise SchemeError(f"QuantConfig target={self.target!r} must be a target name such as 'qnn' (register a "
                              "custom TargetProfile with qtrim_fx.register_profile and pass its name)")
        try:
            object.__setattr__(self, "target", get_profile(self.target).name)
        except ProfileError as e:
            raise SchemeError(f"QuantConfig target: {e}") from None

    def __post_init__(self) -> None:
        self._resolve_range_rule()
        self._resolve_target()
        if not isinstance(self.bias_correction, bool):
            raise SchemeError(f"QuantConfig bias_correction={self.bias_correction!r} must be True or False")
        if self.coverage not in ("warn", "error", "ignore"):
            raise SchemeError(f"QuantConfig coverage={self.coverage!r} must be 'warn', 'error' or 'ignore'")
        for name in ("act_signed", "act_symmetric"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise SchemeError(f"QuantConfig {name}={v!r} must be True, False or None (None: the target's grid)")
        # Building the schemes validates bits (2..16) with the scheme's own messages.
        QuantScheme(bits=self.weight_bits)
        QuantScheme(bits=self.act_bits, signed=self._act_grid()[0], symmetric=self._act_grid()[1])
        for name in ("p_lo", "p_hi"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
                raise SchemeError(f"QuantConfig {name}={p!r} must lie strictly between 0 and 1 (quantile levels; "
                                  "the defaults are p_lo=0.001, p_hi=0.999)")
        if self.p_lo >= self.p_hi:
            raise SchemeError(f"QuantConfig p_lo={self.p_lo} must be below p_hi={self.p_hi} (e.g. p_lo=0.001, "
                              "p_hi=0.999)")
        if not (isinstance(self.momentum, (int, float)) and 0.0 < self.momentum <= 1.0):
            raise SchemeError(f"QuantConfig momentum={self.momentum!r} must lie in (0, 1] (paper: 1e-4..1e-2)")
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not EPS_MIN <= eps <= EPS_MAX:
            raise SchemeError(
                f"QuantConfig eps={eps!r} must be a number in [{EPS_MIN:g}, {EPS_MAX:g}] (default 1e-6): it is the "
                "float32 floor of a statistic's range, so larger values override real weight and activation "
                "ranges and smaller ones give zero scales"
            )
        for name in ("max_samples", "update_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SchemeError(f"QuantConfig {name}={v!r} must be a positive int")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SchemeError(f"QuantConfig seed={self.seed!r} must be an int (the base seed of the observers' "
                              "subsampling, e.g. seed=0)")
        if isinstance(self.overrides, Override) or not isinstance(self.overrides, tuple | list):
            raise SchemeError(f"QuantConfig overrides={self.overrides!r} must be a tuple of Override(...) records, "
                              "e.g. overrides=(Override(name='fc', exclude=True),) (mind the trailing comma)")
        if not isinstance(self.overrides, tuple):
            object.__setattr__(self, "overrides", tuple(self.overrides))
        for o in self.overrides:
            if not isinstance(o, Override):
                raise SchemeError(f"QuantConfig overrides must be Override(...) records, got {o!r}")
            merged = self._apply(o, self.base_settings())
            QuantScheme(bits=merged.weight_bits)
            QuantScheme(bits=merged.act_bits, signed=merged.act_signed, symmetric=merged.act_symmetric)

    def _act_grid(self) -> tuple[bool, bool]:
        """(signed, symmetric) of the activation grid: as given, else the target's, else UINT8 asymmetric."""
        signed, symmetric = self.act_signed, self.act_symmetric
        if (signed is None or symmetric is None) and self.target is not None:
            from qtrim_fx.core.profiles import get_profile

            prof = get_profile(self.target)
            signed = prof.activation_signed if signed is None else signed
            symmetric = prof.activation_symmetric if symmetric is None else symmetric
        return bool(signed), bool(symmetric)

    def base_settings(self) -> SiteSettings:
        signed, symmetric = self._act_grid()
        return SiteSettings(
            weight_bits=self.weight_bits,
            weight_per_channel=self.weight_per_channel,
            act_bits=self.act_bits,
            act_signed=signed,
            act_symmetric=symmetric,
            exclude=False,
        )

    @staticmethod
    def _apply(o: Override, s: SiteSettings) -> SiteSettings:
        changes = {k: getattr(o, k) for k in _OVERRIDABLE if getattr(o, k) is not None}
        return replace(s, **changes) if changes else s

    def settings_for(self, module: str | None, module_type: type | None, op: str) -> SiteSettings:
        """Resolve the settings of a site owned by ``module`` (qualified name) for op kind ``op``."""
        s = self.base_settings()
        for o in self.overrides:
            if o.matches(module, module_type, op):
                s = self._apply(o, s)
        return s

    def observer_kwargs(self) -> dict[str, float | int | str]:
        return {
            "p_lo": self.p_lo,
            "p_hi": self.p_hi,
            "momentum": self.momentum,
            "max_samples": self.max_samples,
            "update_every": self.update_every,
            "act_range": self.act_range,
            "weight_range": self.weight_range,
        }

    def to_dict(self) -> dict[str, object]:
        """Plain, printable form (overrides as their repr)."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "overrides"}
        out["overrides"] = [repr(o) for o in self.overrides]
        return out
