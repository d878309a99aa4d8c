"""Target profiles: what a deployment back end accepts, as data.

A :class:`TargetProfile` is a frozen record read by lowering (which grid and axis each site
gets, whether Conv/Gemm/MatMul outputs carry a Q), by the ONNX passes (opset, IR version,
bias form, weight storage) and by :func:`qtrim_fx.onnx.check.check`. There is no
``if target == "tensorrt"`` anywhere: a new back end is a new profile::

    board = TargetProfile("myboard", activation_signed=True, weight_per_channel=False,
                          opset=13, max_opset=13)
    register_profile(board)              # optional: makes get_profile("myboard") work

The built-in profiles follow ``shared/QDQ_RULES.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import onnx

from qtrim_fx.core.dtypes import storage_by_name, storage_for
from qtrim_fx.core.errors import ProfileError
from qtrim_fx.core.scheme import QuantScheme

__all__ = [
    "GATED_ACTIVATIONS",
    "INTEGER_ACTIVATION_SITES",
    "TargetProfile",
    "WeightAxes",
    "get_profile",
    "profile_names",
    "register_profile",
]

#: Oldest opset with per-channel (``axis``) Q/DQ.
PER_CHANNEL_MIN_OPSET = 13
#: Oldest opset with INT4/UINT4 and INT16/UINT16 Q/DQ.
INT4_MIN_OPSET = 21
#: Ops a profile may ask to be written fused (``fused_ops``), with the oldest opset that has them.
_FUSABLE = {"Gelu": 20}
#: Where an ``activation_sites`` entry puts activation sites around an op: its data inputs, its output, both.
SITE_PLACES = ("in", "out", "in+out")
#: Op kinds (``qtrim_fx.core.spec.OpKind``) an ``activation_sites`` entry may name.
_SITE_KINDS = frozenset({"layernorm", "batchnorm", "softmax", "activation", "relu", "add", "sub", "mul", "div", "pow",
                         "erf", "cat", "pool", "maxpool", "matmul", "bmm"})
#: What an integer-only back end (QNN HTP, NPUs) runs on integers, as (op kind, place) pairs: every tensor
#: these ops read or write carries a Q/DQ, so each op sits in a complete DQ -> op -> Q group. ``matmul`` /
#: ``bmm`` here are the activation x activation products (attention); weighted ones are quantized anyway.
#: ``pow``: by a constant exponent (GPT-2's ``x ** 3``), run as ``DQ -> Pow(DQ(exponent)) -> Q`` on the HTP.
#: ``erf``: GELU's, below opset 20 (``npu``); its own kind, so float-capable targets keep a ``torch.erf`` as it was.
INTEGER_ACTIVATION_SITES: tuple[tuple[str, str], ...] = (
    ("layernorm", "in+out"), ("batchnorm", "in+out"), ("softmax", "out"), ("activation", "out"),
    ("relu", "out"),
    ("add", "out"), ("sub", "out"), ("mul", "out"), ("div", "out"), ("pow", "out"), ("erf", "out"),
    ("cat", "out"), ("pool", "out"), ("maxpool", "out"), ("matmul", "in+out"), ("bmm", "in+out"),
)

#: Activations the torch exporters write as ``Mul(x, gate(x))``: activation -> (the gate's ONNX op, the first
#: opset at which the activation is written as one op, ``None``: never). On a profile that runs both in
#: integer (``("activation", "out")`` and ``("mul", "out")`` sites) the gate needs its own Q/DQ, so a model
#: prepared for it computes ``x · Q(gate(x))`` (:meth:`TargetProfile.gated_activations`); ``check`` names
#: the same pattern when a file leaves the gate float.
GATED_ACTIVATIONS: dict[str, tuple[str, int | None]] = {"silu": ("Sigmoid", None), "hardswish": ("HardSigmoid", 14)}


@dataclass(frozen=True)
class WeightAxes:
    """Per-channel (output channel) axis of a weight, per op kind, in **torch** tensor layout.

    Attributes:
        conv: ``F.conv*d`` weight ``(O, I/g, k...)``: 0.
        conv_transpose: ``F.conv_transpose*d`` weight ``(I, O/g, k...)``: 1 is the output channel
            (ONNX Runtime, QNN); TensorRT wants 0.
        linear: ``F.linear`` weight ``(O, I)``: 0 (exports as Gemm transB=1, or MatMul after the
            exporter's Transpose, which the passes fold so the ONNX axis becomes the last one).
        matmul: right operand ``(..., K, N)`` of ``torch.matmul``: -1 (N).
    """

    conv: int = 0
    conv_transpose: int = 1
    linear: int = 0
    matmul: int = -1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ProfileError(f"WeightAxes.{f.name} must be an int axis (e.g. 0 or -1), got {v!r}")

    def for_op(self, op: str) -> int | None:
        """The axis for an op kind (``conv``, ``conv_transpose``, ``linear``, ``matmul``), else ``None``."""
        return getattr(self, op, None) if op in _AXIS_OPS else None


_AXIS_OPS = frozenset(f.name for f in dataclasses.fields(WeightAxes))


@dataclass(frozen=True)
class TargetProfile:
    """What one back end accepts in a QDQ ONNX file.

    Attributes:
        name: registry key (``onnxruntime``, ``tensorrt``, ...).
        description: one line shown by tools.
        activation_bits, activation_signed, activation_symmetric: the activation grid lowering
            derives qparams for (symmetric: z = 0 signed, 2^(b-1) unsigned).
        extra_activation_dtypes: further activation storage types the back end accepts in
            files made elsewhere (``("uint16",)`` for QNN); checked, never chosen by lowering.
        weight_bits: default weight width (4 needs ``allow_int4`` and opset 21).
        weight_per_channel: per output channel (axis from ``weight_axes``) or one scale per tensor.
        weight_narrow: symmetric weights on ``[-(2^(b-1)-1), 2^(b-1)-1]`` (``[-127, 127]``).
        weight_axes: output-channel axis per op kind, torch layout.
        weight_storage: ``"integer"`` (int8/int4 initializer + DequantizeLinear) or ``"float"``
            (float initializer + QuantizeLinear + DequantizeLinear, for old parsers).
        quantize_op_outputs: lowering puts a Q/DQ on Conv/Gemm/MatMul outputs (ONNX Runtime and
            QNN need it to pick integer kernels; TensorRT wants inputs only).
        enforce_op_outputs: ``check`` reports Conv/Gemm/MatMul outputs that deviate from
            ``quantize_op_outputs`` (off for back ends that accept both).
        bias: ``"float"`` keeps biases float; ``"int32"`` stores them as int32 + DequantizeLinear
            with scale ``s_x * s_w`` (what ORT's and QNN's quantizers write).
        opset: default ONNX opset of exports.
        max_opset: newest opset the back end parses.
        allow_int4: INT4 weights accepted (needs opset >= 21).
        ir_version: ONNX IR version written (and the newest ``check`` accepts).
        fused_ops: compound functions written as one ONNX op, so that an integer back end finds one
            DQ → op → Q group instead of float ops it cannot take: ``("Gelu",)`` (needs opset >= 20;
            the QNN HTP cannot finalize the exporters' Erf decomposition).
        integer_only: the back end runs every op on integers or not at all (the QNN HTP runs the rest
            in FLOAT_32, an NPU on its CPU): ``check`` reports each op outside a complete DQ → op → Q
            group (``float_op``, naming op and tensor).
        quantize_gather_tables: an embedding lookup's activation Q/DQ is stored on its table instead
            (``DQ(int8 table) -> Gather``, the same values): OpenVINO cannot compile an Add of two
            dequantized lookups (token + position embedding).
        activation_sites: ``(op kind, place)`` pairs, ``place`` one of ``"in"``, ``"out"``, ``"in+out"``:
            the extra activation sites ``prepare(..., target=...)`` trains around those ops so the
            back end runs them on integers (:data:`INTEGER_ACTIVATION_SITES` for ``qnn`` and ``npu``).
            Read only when a model is prepared for this target; ``check`` reports a float op of one
            of these kinds as an error (``float_op``).
        integer_attention_scores: the attention scores (QKᵀ, its scaling and mask, softmax, the
            probabilities entering P·V) are quantized too when a model is prepared for this target;
            otherwise they stay float (DESIGN.md), as for every target by default.
        constant_qparams: the back end takes a Q/DQ only with constant scale and zero point
            (TensorRT's explicit quantization, compiled NPU graphs): ``check`` reports one computed at
            run time as an error (elsewhere a warning: the op runs in float).
        matmul_weights_per_tensor: the weights of ops the file writes as ONNX ``MatMul`` (a Linear whose
            input has 3 or more dims, ``x @ W`` with a parameter ``W``) get one scale per tensor when a
            model is prepared for this target (a Linear on 2-D input, a ``Gemm``, keeps
            ``weight_per_channel``). ``qnn``: the HTP runs per-channel MatMul weights 8-10x slower than
            per-tensor ones (QNN profile of vit_tiny; the file as a whole ~2x, see benchmarks/RESULTS.md).
            Needs the example inputs at ``prepare`` (the input rank decides MatMul vs Gemm); an
            ``Override(..., weight_per_channel=...)`` matching the layer wins.
        unsigned_weights: int8 weight codes of Conv / MatMul / Gemm are stored as uint8 around zero point 128
            (the same grid: every weight dequantizes to the same float). ONNX Runtime's uint8 x int8 CPU kernels
            saturate on x86 CPUs without VNNI (AVX2, AVX-512F: ``vpmaddubsw``'s int16 pair sums) and return
            silently wrong outputs there; its uint8 x uint8 kernels do not
            (:mod:`qtrim_fx.onnx.unsigned_weights`).
    """

    name: str
    description: str = ""
    activation_bits: int = 8
    activation_signed: bool = False
    activation_symmetric: bool = False
    extra_activation_dtypes: tuple[str, ...] = ()
    weight_bits: int = 8
    weight_per_channel: bool = True
    weight_narrow: bool = True
    weight_axes: WeightAxes = WeightAxes()
    weight_storage: Literal["integer", "float"] = "integer"
    quantize_op_outputs: bool = True
    enforce_op_outputs: bool = True
    bias: Literal["float", "int32"] = "float"
    opset: int = 17
    max_opset: int = 21
    allow_int4: bool = False
    ir_version: int = 10
    fused_ops: tuple[str, ...] = ()
    quantize_gather_tables: bool = False
    integer_only: bool = False
    activation_sites: tuple[tuple[str, str], ...] = ()
    integer_attention_scores: bool = False
    matmul_weights_per_tensor: bool = False
    constant_qparams: bool = False
    unsigned_weights: bool = False

    def __post_init__(self) -> None:
        for rule in _RULES:
            rule(self)

    # -- what lowering asks ------------------------------------------------------------------
    def activation_scheme(self, bits: int | None = None) -> QuantScheme:
        """The per-tensor activation grid (``bits`` overrides ``activation_bits``)."""
        b = self.activation_bits if bits is None else bits
        _require_storage_opset(self, b, "activation")
        return QuantScheme(bits=b, signed=self.activation_signed, symmetric=self.activation_symmetric)

    def weight_scheme(self, op: str, bits: int | None = None) -> QuantScheme:
        """The symmetric weight grid for an op kind, with its torch-layout channel axis.

        Per-tensor when the profile is per-tensor or the op has no channel rule (``bmm``, ...).
        """
        b = self.weight_bits if bits is None else bits
        if b <= 4 and not self.allow_int4:
            raise ProfileError(f"target {self.name!r} does not accept INT4 weights; use bits=8 or a "
                               "profile with allow_int4=True and opset=21")
        _require_storage_opset(self, b, "weight")
        axis = self.weight_axes.for_op(op) if self.weight_per_channel else None
        return QuantScheme(bits=b, signed=True, symmetric=True, axis=axis, narrow=self.weight_narrow)

    def gated_activations(self, opset: int | None = None) -> tuple[str, ...]:
        """The :data:`GATED_ACTIVATIONS` this profile runs as ``x · Q(gate(x))`` at ``opset`` (default: its own).

        Those the exporters write as two ops at that opset, when the profile puts integer sites on
        activation and Mul outputs (``qnn``: ``silu``; ``npu`` at opset 13: ``silu``, ``hardswish``).
        """
        opset = self.opset if opset is None else opset
        outs = {kind for kind, place in self.activation_sites if "out" in place.split("+")}
        if not {"activation", "mul"} <= outs:
            return ()
        return tuple(a for a, (_, since) in GATED_ACTIVATIONS.items() if since is None or opset < since)

    def decomposes_gelu(self) -> bool:
        """GELU runs as the primitives the exporters write without a ``Gelu`` op (``Div -> Erf -> Add -> Mul ->
        Mul``; tanh: ``Pow``, ``Tanh`` too), each in a DQ -> op -> Q group: integer sites on their outputs and
        no ``Gelu`` in ``fused_ops`` (``npu``; ``qnn`` writes one ``Gelu`` op)."""
        outs = {kind for kind, place in self.activation_sites if "out" in place.split("+")}
        return "Gelu" not in self.fused_ops and {"activation", "erf", "add", "mul", "div", "pow"} <= outs

    # -- what check asks ---------------------------------------------------------------------
    @property
    def activation_dtypes(self) -> tuple[str, ...]:
        """Accepted activation storage names, the lowering one first."""
        main = storage_for(self.activation_bits, self.activation_signed).name
        return (main, *(d for d in self.extra_activation_dtypes if d != main))

    @property
    def weight_dtypes(self) -> tuple[str, ...]:
        """Accepted weight storage names."""
        names = [storage_for(self.weight_bits, True).name, "int8"]
        if self.unsigned_weights:
            names.insert(0, "uint8")
        if self.allow_int4:
            names.append("int4")
        return tuple(dict.fromkeys(names))

    def replace(self, **changes: Any) -> TargetProfile:
        """A validated copy with some fields changed, e.g. ``p.replace(opset=21, weight_bits=4)``."""
        return dataclasses.replace(self, **changes)


def _require_storage_opset(p: TargetProfile, bits: int, what: str) -> None:
    st = storage_for(bits, True)
    if st.min_opset > p.opset:
        names = f"{st.name}/u{st.name}" if what == "activation" else st.name
        fix = (f"pass opset={st.min_opset}" if st.min_opset <= p.max_opset else
               f"it parses opset <= {p.max_opset}: use 8-bit {what}s or a target that parses opset {st.min_opset}")
        raise ProfileError(f"{bits}-bit {what}s are stored as {names}, which needs opset >= {st.min_opset}; "
                           f"target {p.name!r} exports opset {p.opset} ({fix})")


# -- validation: each rule names the problem and the fix -------------------------------------
def _check_types(p: TargetProfile) -> None:
    if not isinstance(p.name, str) or not p.name:
        raise ProfileError(f"profile name must be a non-empty string, got {p.name!r}")
    for f in ("activation_bits", "weight_bits", "opset", "max_opset", "ir_version"):
        v = getattr(p, f)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"profile {p.name!r}: {f} must be an int, got {v!r}")
    for f in ("activation_signed", "activation_symmetric", "weight_per_channel", "weight_narrow",
              "quantize_op_outputs", "enforce_op_outputs", "allow_int4", "quantize_gather_tables",
              "integer_only", "integer_attention_scores", "matmul_weights_per_tensor", "constant_qparams"):
        if not isinstance(getattr(p, f), bool):
            raise ProfileError(f"profile {p.name!r}: {f} must be True or False, got {getattr(p, f)!r}")
    if not isinstance(p.weight_axes, WeightAxes):
        raise ProfileError(f"profile {p.name!r}: weight_axes must be a WeightAxes(...), got {p.weight_axes!r}")
    if p.weight_storage not in ("integer", "float"):
        raise ProfileError(f"profile {p.name!r}: weight_storage must be 'integer' or 'float', "
                           f"got {p.weight_storage!r}")
    if p.bias not in ("float", "int32"):
        raise ProfileError(f"profile {p.name!r}: bias must be 'float' or 'int32', got {p.bias!r}")


def _check_bits(p: TargetProfile) -> None:
    for f in ("activation_bits", "weight_bits"):
        if not 2 <= getattr(p, f) <= 16:
            raise ProfileError(f"profile {p.name!r}: {f}={getattr(p, f)} is outside 2..16; use 8 or 4")
    if not isinstance(p.extra_activation_dtypes, tuple):
        raise ProfileError(f"profile {p.name!r}: extra_activation_dtypes must be a tuple such as ('uint16',)")
    for d in p.extra_activation_dtypes:
        try:
            st = storage_by_name(d)
        except ValueError as e:
            raise ProfileError(f"profile {p.name!r}: {e}") from None
        if st.min_opset > p.max_opset:
            raise ProfileError(f"profile {p.name!r}: activation dtype {d} needs opset >= {st.min_opset} but "
                               f"max_opset={p.max_opset}; drop it or raise max_opset")


def _check_opsets(p: TargetProfile) -> None:
    if p.opset > p.max_opset:
        raise ProfileError(f"profile {p.name!r}: opset={p.opset} is above max_opset={p.max_opset}; "
                           f"lower opset or raise max_opset")
    floor = PER_CHANNEL_MIN_OPSET if p.weight_per_channel else 10
    if p.opset < floor:
        raise ProfileError(f"profile {p.name!r}: opset={p.opset} is too old; Q/DQ need >= 10 and "
                           f"per-channel weights >= {PER_CHANNEL_MIN_OPSET}; use opset >= {floor}")
    if p.allow_int4 and p.max_opset < INT4_MIN_OPSET:
        raise ProfileError(f"profile {p.name!r}: allow_int4=True contradicts max_opset={p.max_opset}; INT4 "
                           f"needs opset >= {INT4_MIN_OPSET} (set allow_int4=False or max_opset >= 21)")
    if not isinstance(p.fused_ops, tuple) or any(op not in _FUSABLE for op in p.fused_ops):
        raise ProfileError(f"profile {p.name!r}: fused_ops={p.fused_ops!r}; use a tuple of "
                           f"{', '.join(repr(o) for o in _FUSABLE)} (or ())")
    for op in p.fused_ops:
        if p.opset < _FUSABLE[op]:
            raise ProfileError(f"profile {p.name!r} writes {op} as one ONNX op, which needs opset >= "
                               f"{_FUSABLE[op]}, but opset={p.opset}; pass opset={_FUSABLE[op]} (or a profile "
                               "with fused_ops=())")
    if p.weight_bits <= 4 and not p.allow_int4:
        raise ProfileError(f"profile {p.name!r}: weight_bits={p.weight_bits} needs allow_int4=True")
    for what, bits in (("weight", p.weight_bits), ("activation", p.activation_bits)):
        _require_storage_opset(p, bits, what)


def _check_ir_version(p: TargetProfile) -> None:
    need = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", p.opset)])
    if p.ir_version < need:
        raise ProfileError(f"profile {p.name!r}: opset {p.opset} needs IR version >= {need}, "
                           f"got ir_version={p.ir_version}")
    if p.ir_version > 10:
        raise ProfileError(f"profile {p.name!r}: ir_version={p.ir_version} is newer than runtimes load "
                           "reliably (ONNX Runtime 1.31 stops at 13, older ones earlier); use 10")


def _check_activation_sites(p: TargetProfile) -> None:
    sites = p.activation_sites
    ok = isinstance(sites, tuple) and all(
        isinstance(e, tuple) and len(e) == 2 and e[0] in _SITE_KINDS and e[1] in SITE_PLACES for e in sites)
    if not ok:
        raise ProfileError(f"profile {p.name!r}: activation_sites={sites!r}; use a tuple of (op kind, place) pairs, "
                           f"op kind one of {', '.join(sorted(_SITE_KINDS))}, place one of {', '.join(SITE_PLACES)} "
                           "(e.g. (('layernorm', 'in+out'), ('softmax', 'out')))")


_RULES: tuple[Callable[[TargetProfile], None], ...] = (
    _check_types, _check_bits, _check_opsets, _check_ir_version, _check_activation_sites)


# -- the registry ----------------------------------------------------------------------------
_BUILTIN = (
    TargetProfile(
        "onnxruntime", "ONNX Runtime CPU/CUDA: uint8 asym activations, int8 per-channel weights, "
        "Q on Conv/Gemm/MatMul outputs so QLinearConv/QGemm are chosen",
        extra_activation_dtypes=("int8",), allow_int4=True),
    TargetProfile(
        "onnxruntime_avx2", "ONNX Runtime CPU on x86 without VNNI (AVX2, AVX-512F): as onnxruntime, with the "
        "int8 weight grid stored as uint8 around 128 so the U8U8 kernels run (U8S8 saturates there)",
        extra_activation_dtypes=("int8",), allow_int4=True, unsigned_weights=True),
    TargetProfile(
        "tensorrt", "TensorRT 10: int8 symmetric activations (z = 0), per-channel weights, Q/DQ on "
        "inputs only, opset <= 20",
        activation_signed=True, activation_symmetric=True, weight_axes=WeightAxes(conv_transpose=0),
        quantize_op_outputs=False, max_opset=20, constant_qparams=True),
    TargetProfile(
        "qnn", "ONNX Runtime QNN (Qualcomm HTP): uint8 asym activations (uint16 accepted), full QDQ "
        "groups with int32 bias, GELU as one Gelu op (opset 20), per-tensor MatMul weights when prepared for it",
        extra_activation_dtypes=("uint16",), bias="int32", allow_int4=True, opset=20, fused_ops=("Gelu",),
        integer_only=True, activation_sites=INTEGER_ACTIVATION_SITES, integer_attention_scores=True,
        matmul_weights_per_tensor=True, constant_qparams=True),
    TargetProfile(
        "openvino", "OpenVINO CPU: uint8 asym activations, per-channel weights; Q/DQ on inputs is "
        "enough, outputs may be quantized",
        extra_activation_dtypes=("int8",), quantize_op_outputs=False, enforce_op_outputs=False,
        allow_int4=True, quantize_gather_tables=True),
    TargetProfile(
        "npu", "Generic edge NPU (RKNN-like): int8 asym activations, per-tensor int8 weights, full "
        "QDQ, opset <= 19",
        activation_signed=True, weight_per_channel=False, opset=13, max_opset=19, integer_only=True,
        activation_sites=INTEGER_ACTIVATION_SITES, integer_attention_scores=True, constant_qparams=True),
)
_REGISTRY: dict[str, TargetProfile] = {p.name: p for p in _BUILTIN}
_ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "ov": "openvino"}


def profile_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_profile` (aliases excluded)."""
    return tuple(_REGISTRY)


def get_profile(target: str | TargetProfile) -> TargetProfile:
    """Resolve a target name (or pass a :class:`TargetProfile` through).

    Raises:
        ProfileError: unknown name; the message lists the known ones.
    """
    if isinstance(target, TargetProfile):
        return target
    if not isinstance(target, str):
        raise ProfileError(f"target must be a profile name or a TargetProfile, got {type(target).__name__}")
    key = _ALIASES.get(target.lower(), target.lower())
    if key not in _REGISTRY:
        raise ProfileError(f"unknown target {target!r}; known targets: {', '.join(profile_names())} "
                           "(or build your own TargetProfile(...))")
    return _REGISTRY[key]


def register_profile(profile: TargetProfile, *, overwrite: bool = False) -> TargetProfile:
    """Make ``get_profile(profile.name)`` return ``profile``; refuses to shadow a name unless ``overwrite``."""
    if not isinstance(profile, TargetProfile):
        raise ProfileError(f"register_profile needs a TargetProfile, got {type(profile).__name__}")
    key = profile.name.lower()
    if not overwrite and (key in _REGISTRY or key in _ALIASES):
        raise ProfileError(f"a target named {profile.name!r} exists; pass overwrite=True to replace it")
    _REGISTRY[key] = profile
    return profile
