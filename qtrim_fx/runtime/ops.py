"""Graph-level helper ops inserted by the passes (FX leaves: ``torch.fx.wrap``).

BatchNorm folding during training (conv -> bn pairs), as materialize emits it::

    f  = bn_fold_factor(bn.weight, bn.running_var, eps)    # γ / sqrt(var + eps), per out channel
    wq = qtrim_sites.<conv.weight>(conv.weight, f)          # FoldedWeightSite: observes and
                                                            # fake-quantizes w·f, returns Q(w·f) / f
    y  = F.conv2d(x, wq, conv.bias, ...)                     # unchanged conv (bias included)
    z  = bn(y)                                               # BN still trains with batch stats

The site observes and quantizes the *folded* weight ``w·f`` (the weight that is
deployed) and hands the conv ``Q(w·f) / f`` (computed as ``q · (s / f)`` from the exact integer
grid ``q`` of ``w·f``, see ``qtrim_fx.runtime.blend._BlendFoldedFn``), so in eval
``bn(conv(x, Q(w·f)/f) + b) = conv(x, Q(w·f)) + (b − mean)·f + β``, which is the
deployed folded conv (up to float rounding). At λ = 0 the site returns ``w``
untouched, so the prepared model is bit-identical to the original. Lowering
(``FoldBatchNormPass``) replaces the pattern by one conv with the folded weight
``w·f`` fed to a plain weight site and the folded bias, and drops the BN node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from qtrim_fx.core.fakequant import channel_view

__all__ = [
    "GATES",
    "GELU_STEPS",
    "attention_defaults",
    "bn_fold_factor",
    "causal_keep",
    "channel_shape",
    "deferred_relu",
    "gate_product",
    "gelu_product",
    "gelu_steps",
    "is_deferred_relu",
    "relu_keep_mask",
    "relu_now",
]


@torch.fx.wrap
def attention_defaults(x: torch.Tensor, attn_mask: Any = None, is_causal: Any = False) -> torch.Tensor:
    """``x`` unchanged, after checking that an attention the graph wrote out for its defaults got them.

    ``DecomposeAttentionPass`` writes ``scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c)`` whose
    ``m`` / ``c`` are forward arguments defaulting to ``None`` / ``False`` (timm's ``Attention.forward(x,
    attn_mask=None)``) as the attention without a mask; a caller passing one would be ignored silently.

    Raises:
        ValueError: a mask or ``is_causal=True`` was passed.
    """
    if attn_mask is not None or (is_causal is not None and is_causal is not False and bool(is_causal)):
        raise ValueError("this model was prepared for an integer-only target with its attention written out for "
                         "attn_mask=None, is_causal=False (their defaults when prepared); call it without them, or "
                         "prepare it with example inputs that pass them")
    return x


@torch.fx.wrap
def causal_keep(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The (L, S) bool mask of ``scaled_dot_product_attention(..., is_causal=True)``: query i sees keys 0..i.

    torch's own math attention builds it as ``ones(L, S, dtype=bool).tril(diagonal=0)``; so does this.
    """
    return torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(diagonal=0)


@torch.fx.wrap
def bn_fold_factor(bn_weight: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel factor γ / sqrt(var + eps) (γ = 1 for a non-affine BN)."""
    # Read by the weight's site only, which detaches it: no autograd history (γ requires grad).
    inv_std = torch.rsqrt(running_var.detach() + eps)
    return inv_std if bn_weight is None else inv_std.mul_(bn_weight.detach())


#: A per-channel vector shaped to broadcast along ``axis`` of an ``ndim``-D tensor (the core helper).
channel_shape = channel_view


class _ReluKeepMaskFn(torch.autograd.Function):
    """``relu(x)`` that saves a 1-byte "passes" mask for backward instead of its 4-byte output.

    The gradient is relu's own, ``threshold_backward(grad, y, 0)``: 0 where the output ``y`` is
    <= 0, else the incoming gradient (so a NaN input passes its gradient, and a NaN gradient at a
    zeroed position becomes 0). The mask is ``y != 0`` taken by a dtype conversion of ``y``
    (true for positive and NaN outputs, exactly where ``y <= 0`` is false), and backward feeds it,
    converted back to the gradient's dtype (0 or 1), to the same ``threshold_backward``.

    Conversions are used because on the CPU a comparison producing ``bool`` (``x <= 0``) is ~5x
    slower than ``relu`` itself and ``masked_fill``/``where`` with a bool mask ~25x slower than
    ``threshold_backward`` (measured with torch 2.14 on AVX-512); ``to(bool)``, the bool→uint8
    view and uint8→float are vectorized.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(x)
        ctx.save_for_backward(y.to(torch.bool))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (passes,) = ctx.saved_tensors
        # bool -> uint8 is a free view; uint8 -> float is vectorized (bool -> float is not).
        return torch.ops.aten.threshold_backward(grad, passes.view(torch.uint8).to(grad.dtype), 0)


class _DeferredReluFn(torch.autograd.Function):
    """A view of ``x`` standing for ``relu(x)`` that only quantization sites read; identity gradient.

    See :func:`deferred_relu`. Backward is the identity: a site that quantizes ``x`` directly masks the
    gradient itself (its clipped straight-through mask blocks ``x̃ <= 0``), and a site that cannot applies
    :func:`relu_keep_mask` to the view (:func:`relu_now`), whose backward is relu's own.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


_DEFERRED_NODE = _DeferredReluFn._backward_cls


def is_deferred_relu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a :func:`deferred_relu` output: ``relu`` not yet applied (see there)."""
    return type(x.grad_fn) is _DEFERRED_NODE


def relu_now(x: torch.Tensor) -> torch.Tensor:
    """``relu`` of a :func:`deferred_relu` output (``relu_keep_mask``: the value and gradient of ``torch.relu``)."""
    return relu_keep_mask(x)


@torch.library.custom_op("qtrim_fx::relu_backward", mutates_args=())
def _relu_backward_op(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """relu's gradient from its output ``y`` (``threshold_backward``), opaque to ``torch.compile``."""
    return torch.ops.aten.threshold_backward(grad, y, 0)


@_relu_backward_op.register_fake
def _(grad, y):
    return torch.empty_like(grad)


class _ReluCompiledFn(torch.autograd.Function):
    """``relu(x)`` for compiled graphs: backward is one opaque op on the float output.

    Traced as plain relu, inductor's partitioner saves a ``bool`` mask for relu's backward when the
    output has no other reader (here: a quantization site). Storing that mask from an inductor CPU
    kernel measured ~10x slower than eager (torch 2.14: ~18 ms vs ~1.8 ms per 4M elements on
    AVX-512 and on AVX2), which made a compiled prepared ResNet slower than eager. An opaque
    backward op cannot be decomposed into the compare that gets moved to the forward, so the float
    output (4 bytes/element, what FP32 keeps for relu anyway) is saved instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.qtrim_fx.relu_backward(grad, y)


@torch.fx.wrap
def relu_keep_mask(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)`` with the same value and gradient, but autograd keeps a bool mask, not the output.

    ``torch.relu`` saves its output for backward. When the only reader of that output is a
    quantization site (which saves nothing), the output would be kept alive for relu's backward
    alone, next to the site's blended copy that the following layer saves: one extra
    activation-sized float tensor per site. Saving ``y != 0`` (1 byte per element) instead frees
    it. Without autograd (eval, ``no_grad``) this is plain ``torch.relu``.
    """
    # Under torch.compile the float output is kept (see _ReluCompiledFn: inductor's bool-mask store
    # is slow on the CPU); under TorchScript tracing (legacy ONNX export) a plain relu is traced.
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return _ReluCompiledFn.apply(x) if torch.compiler.is_compiling() else _ReluKeepMaskFn.apply(x)
    return torch.relu(x)


@torch.fx.wrap
def deferred_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)`` for a ReLU whose output only quantization sites read; in eager training, not computed.

    ``LeanReluPass`` writes it for such ReLUs. A site (``QuantSite``) that quantizes at λ = 1 on a grid whose
    lower end is exactly 0 gets the same values and gradient from ``x`` itself: ``Q(relu(x)) == Q(x)`` there
    (the clamp at ``q_min = z`` is the ReLU: every ``x <= 0`` lands on the code of 0, NaN stays NaN, and the
    dequantized ``-0.0`` is written as ``+0.0`` either way), and the site's clipped straight-through mask
    (``lo = 0 < x̃``) zeroes the gradient wherever relu's would. So in eager training (autograd recording,
    ``x`` requires grad) this returns a view of ``x`` marked as deferred (:func:`is_deferred_relu`): two passes
    and two allocations fewer per site (relu's output and its mask); an observer, on its update calls, reads
    ``relu`` of a detached copy. Every other read — λ < 1, a grid not starting at 0, a disabled site —
    applies :func:`relu_now` first, which is :func:`relu_keep_mask` (relu's value and gradient). Without
    autograd, under ``torch.compile`` or TorchScript tracing, this is :func:`relu_keep_mask`.

    The returned view is **not** ``relu(x)``: only quantization sites may read it (``LeanReluPass`` only
    writes it for ReLUs read by sites alone; ``RestoreReluPass`` turns it into ``torch.relu`` for export).
    """
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        return _DeferredReluFn.apply(x)
    return relu_keep_mask(x)


#: activation -> (the activation, its gate): ``activation(x) == x · gate(x)`` up to float rounding
#: (the names of :data:`qtrim_fx.core.profiles.GATED_ACTIVATIONS`).
GATES: dict[str, tuple[Any, Any]] = {"silu": (F.silu, torch.sigmoid), "hardswish": (F.hardswish, F.hardsigmoid)}


@torch.fx.wrap
def gate_product(x: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
    """``x · gate``, where ``gate`` is the (quantized) gate of ``activation`` (silu: sigmoid(x)), bit for bit
    ``activation(x)`` wherever the gate is the float one.

    A gated activation prepared for an integer-only target is ``gate -> site -> gate_product``, so what is
    trained is what the file computes (``x · DQ(Q(gate(x)))``). At λ = 0 the site returns the gate
    untouched and this returns the activation's own value (``x · sigmoid(x)`` differs from ``silu(x)`` in
    the last bit on ~20 % of elements), so the prepared model stays exact FP32. Lowering writes
    ``torch.mul(x, gate)`` (``MultiplyGatesPass``).
    """
    if torch.jit.is_tracing():
        return x * gate
    act, gate_of = GATES[activation]
    with torch.no_grad():  # only selects; the gradient follows the chosen branch
        float_gate = gate == gate_of(x)
    return torch.where(float_gate, act(x), x * gate)


#: GELU as the torch exporters write it below opset 20, one ``(function, operands)`` per primitive up to
#: ``m = x · (1 + Φ-part)``; ``gelu(x) == 0.5 · m`` up to float rounding. An operand is ``"x"`` (the input),
#: ``"prev"`` (the previous step's result) or a Python number (a constant the file writes as one exact code).
GELU_STEPS: dict[str, tuple[tuple[Any, tuple[Any, ...]], ...]] = {
    "none": (
        (torch.div, ("x", 1.4142135623730951)), (torch.erf, ("prev",)), (torch.add, ("prev", 1.0)),
        (torch.mul, ("x", "prev")),
    ),
    "tanh": (
        (torch.pow, ("x", 3.0)), (torch.mul, ("prev", 0.044715)), (torch.add, ("x", "prev")),
        (torch.mul, ("prev", 0.7978845608028654)), (torch.tanh, ("prev",)), (torch.add, ("prev", 1.0)),
        (torch.mul, ("x", "prev")),
    ),
}


def gelu_steps(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``m = x · (1 + ...)`` of :data:`GELU_STEPS` in float, op for op as a decomposed graph computes it."""
    prev = x
    for fn, operands in GELU_STEPS[approximate]:
        prev = fn(*(x if o == "x" else prev if o == "prev" else o for o in operands))
    return prev


@torch.fx.wrap
def gelu_product(m: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``0.5 · m``, where ``m`` is the (quantized) last product of :data:`GELU_STEPS` of ``x``, bit for bit
    ``F.gelu(x, approximate=approximate)`` wherever ``m`` is the float one.

    A GELU prepared for an integer-only target without a ``Gelu`` op (opset < 20) is its primitives with a
    site on each, so what is trained is what the file computes. At λ = 0 every site returns its input
    untouched, ``m`` equals :func:`gelu_steps` and this returns ``F.gelu``'s own value (the composed form
    differs from it in the last bit), so the prepared model stays exact FP32. Lowering writes
    ``torch.mul(m, 0.5)`` (``MultiplyGatesPass``).
    """
    if torch.jit.is_tracing():
        return m * 0.5
    with torch.no_grad():  # only selects; the gradient follows the chosen branch
        float_m = m == gelu_steps(x, approximate)
    return torch.where(float_m, F.gelu(x, approximate=approximate), m * 0.5)
