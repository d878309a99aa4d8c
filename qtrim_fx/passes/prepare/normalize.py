"""NormalizeOpsPass: one view of "what op is this node" for every front end (analysis only).

Writes ``node.meta[OP_KIND]`` (an :data:`~qtrim_fx.core.spec.OpKind`) on every node,
whether the graph came from symbolic tracing (``call_module`` / ``call_function`` /
``call_method``) or from ``torch.export`` (ATen overloads)::

    call_module conv1 (nn.Conv2d)            -> "conv"
    call_function F.linear / aten.linear     -> "linear"
    call_method x.transpose(-2, -1)          -> "reshape"
    call_function aten.convolution(..., transposed=True, ...) -> "conv_transpose"

The graph itself is not changed (``modified`` is always False).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.attrs import resolve_attr
from qtrim_fx.core.spec import OP_KIND
from qtrim_fx.passes.base import GraphPass, PassResult
from qtrim_fx.passes.prepare.ranks import FLOATING

__all__ = ["NormalizeOpsPass", "arg", "is_tensor_node", "op_kind", "target_name"]

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
    ((nn.Linear,), "linear"),
    ((nn.MultiheadAttention,), "mha"),
    ((nn.modules.batchnorm._BatchNorm,), "batchnorm"),
    ((nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm), "layernorm"),
    ((nn.Softmax, nn.LogSoftmax), "softmax"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity), "dropout"),
    ((nn.Flatten, nn.Unflatten), "reshape"),
    ((nn.Embedding,), "embedding"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
      nn.AdaptiveMaxPool3d), "maxpool"),
    (
        (
            nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        ),
        "pool",
    ),
    ((nn.ReLU, nn.ReLU6, nn.Hardtanh), "relu"),
    (
        (
            nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
            nn.Mish, nn.Softplus, nn.PReLU, nn.SELU, nn.CELU,
        ),
        "activation",
    ),
)

# Names of functions, methods and ATen ops (overload packet names) by kind.
_NAME_KINDS: dict[str, str] = {}
for _kind, _names in {
    "conv": "conv1d conv2d conv3d",
    "conv_transpose": "conv_transpose1d conv_transpose2d conv_transpose3d",
    "linear": "linear",
    "matmul": "matmul mm __matmul__",
    "bmm": "bmm",
    "baddbmm": "baddbmm",
    "addmm": "addmm",  # bias + x @ W (Hugging Face GPT-2's Conv1D)
    "einsum": "einsum",
    "sdpa": "scaled_dot_product_attention",
    "softmax": "softmax _softmax log_softmax _log_softmax _safe_softmax",
    "add": "add iadd add_ __add__ __radd__ __iadd__",
    "sub": "sub isub rsub sub_ __sub__ __rsub__",
    "mul": "mul imul mul_ __mul__ __rmul__ gate_product gelu_product",
    "div": "div truediv itruediv div_ __truediv__ floordiv",
    "pow": "pow pow_ __pow__ __rpow__",
    "erf": "erf erf_",
    "cat": "cat concat concatenate stack",
    "relu": "relu relu_ relu6 hardtanh hardtanh_ relu_keep_mask deferred_relu",
    "activation": (
        "gelu silu silu_ hardswish hardswish_ hardsigmoid sigmoid sigmoid_ tanh tanh_ leaky_relu elu mish "
        "softplus prelu selu celu"
    ),
    "batchnorm": "batch_norm _native_batch_norm_legit_no_training _native_batch_norm_legit",
    "layernorm": "layer_norm group_norm instance_norm native_layer_norm rms_norm",
    # reductions over axes: mean (ReduceMean) and sum (ReduceSum: ResNeSt's / SKNet's sum over branches)
    "pool": "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d mean sum",
    "maxpool": (
        "max_pool1d max_pool2d max_pool3d adaptive_max_pool1d adaptive_max_pool2d max_pool2d_with_indices"
    ),
    "dropout": "dropout dropout_ feature_dropout alpha_dropout clone identity attention_defaults",
    "reshape": (
        "view reshape permute transpose t contiguous flatten unflatten squeeze unsqueeze expand "
        "expand_as chunk split split_with_sizes unbind narrow slice select getitem _unsafe_view movedim "
        "to type type_as float half bfloat16 alias repeat tile roll flip fliplr flipud rot90"
    ),
    "mask": "masked_fill masked_fill_ where",
    "embedding": "embedding",
    "nontensor": "size dim numel sym_size sym_numel sym_stride getattr len item tolist __len__ stride",
}.items():
    for _n in _names.split():
        _NAME_KINDS[_n] = _kind


_CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"})


def target_name(node: fx.Node) -> str:
    """The bare name of a call's target: ``conv2d``, ``add``, ``transpose`` (ATen: packet name)."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__.split(".")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__.split(".")[-1]
    return getattr(t, "__name__", str(t))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The normalized op kind of ``node`` (see :data:`~qtrim_fx.core.spec.OpKind`)."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        for types, kind in _MODULE_KINDS:
            if isinstance(m, types):
                return kind
        return "module"
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.target is builtins.getattr:
        return "nontensor"
    if node.target is operator.getitem:
        return "reshape"
    name = target_name(node)
    kind = _NAME_KINDS.get(name, "other")
    if name in _CLAMPS and not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        kind = "relu"  # clamp to constant bounds is hardtanh (a hand-written ReLU6: x.clamp(0, 6)); tensor bounds: other
    if name == "convolution":  # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
        kind = "conv_transpose" if arg(node, 6, "transposed", False) else "conv"
    return kind


def is_tensor_node(node: Any, kinds: dict[fx.Node, str], modules: dict[str, nn.Module]) -> bool:
    """Best-effort static answer to "does this node produce a floating-point tensor"."""
    if not isinstance(node, fx.Node):
        return False
    if FLOATING in node.meta:  # from a fake-tensor run of the example inputs (prepare.ranks)
        return bool(node.meta[FLOATING])
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    if val is not None and hasattr(val, "dtype") and hasattr(val, "shape"):
        return bool(val.dtype.is_floating_point)
    if val is not None and not isinstance(val, (tuple, list)):
        return False
    kind = kinds.get(node, "other")
    if node.op == "get_attr":
        obj = _resolve(modules, str(node.target))
        return isinstance(obj, torch.Tensor) and obj.is_floating_point()
    if node.op == "placeholder":
        return True
    if kind == "nontensor" or node.op == "output":
        return False
    if node.op in ("call_function", "call_method") and _integer_result(node):
        return False
    inputs = [a for a in node.all_input_nodes]
    if node.target is operator.getitem or kind in ("add", "sub", "mul", "div", "pow", "reshape", "mask", "relu"):
        # ``relu`` kind: also a clamp to constant bounds, of indices as well as of activations
        return any(is_tensor_node(a, kinds, modules) for a in inputs[:2])
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        # Python arithmetic (``%``, ``//``, comparisons ...) on sizes is shape bookkeeping (swin's padding:
        # ``(w - H % w) % w``); on tensors it is a tensor
        return any(is_tensor_node(a, kinds, modules) for a in inputs)
    return True


#: calls whose result holds integers (or bools) whatever their inputs: indices, counts, casts
_INTEGER_RESULTS = frozenset({"argmax", "argmin", "randint", "randperm", "nonzero", "bucketize", "searchsorted",
                              "long", "int", "short", "bool", "byte"})


def _integer_result(node: fx.Node) -> bool:
    name = target_name(node)
    if name == "arange":  # integer unless a bound or step is a float, or a float dtype is asked for
        dtype = node.kwargs.get("dtype")
        return not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) and not any(
            isinstance(a, float) for a in node.args)
    return name in _INTEGER_RESULTS


def _resolve(modules: dict[str, nn.Module], target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return resolve_attr(modules.get(owner), attr)


class NormalizeOpsPass(GraphPass):
    """Annotate every node with its normalized op kind (``node.meta[OP_KIND]``)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            node.meta[OP_KIND] = op_kind(node, modules)
        return PassResult(gm, False)
