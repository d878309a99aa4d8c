"""``check(model, target)``: every way a finished QDQ ONNX file breaks a target's rules.

Works on any ONNX file (ours, ONNX Runtime's ``quantize_static``, NVIDIA ModelOpt, ...). Each
rule is a small function ``(context) -> violations``; a :class:`Violation` names the rule, the
node and what to change. ``severity="error"`` means the target rejects the file or computes
something else than intended; ``"warning"`` means it runs but misses integer kernels or
stores more than needed.

Untrusted input: a file is parsed without its external data; external data references that are
absolute, leave the model's folder or name a FIFO/device are refused before anything opens them
(``external_data``), and ``onnx.checker.check_model(full_check=True)`` must accept the model
(``invalid_model``; see :mod:`qtrim_fx.onnx.validity`). A broken file always gives at least one
error: an unparseable or refused file gets only that violation; an invalid model also gets the
rules below, as far as its graph can be walked.

Rules (``rule`` field): ``invalid_model``, ``external_data``, ``no_quantized_op``, ``scale_value``,
``non_standard_op``, ``zero_point_missing``, ``scale_not_scalar``,
``zero_point_shape``, ``activation_dtype``, ``activation_zero_point``, ``weight_dtype``,
``weight_zero_point``, ``weight_float_storage``, ``weight_per_channel``, ``weight_axis``,
``softmax_quantized``, ``op_output_quantized``, ``op_output_not_quantized``,
``op_input_not_dequantized``, ``opset_too_new``,
``opset_per_channel``, ``ir_version``, ``int4_opset``, ``int4_not_allowed``.
"""

from __future__ import annotations

import contextlib
import os

import onnx
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.onnx.check_rules import RULES, RuleContext, Violation, quantized_ops
from qtrim_fx.onnx.validity import (
    Finding,
    checker_findings,
    external_data_findings,
    quiet_onnx_ir,
    read_untrusted,
)

__all__ = ["Violation", "check"]

def check(model: str | os.PathLike[str] | onnx.ModelProto | ir.Model, target: str | TargetProfile) -> list[Violation]:
    """List every violation of ``target``'s rules in a QDQ ONNX model.

    The model is treated as untrusted: a file that does not parse, external data that points
    outside the model's folder or at a FIFO, and a model ``onnx.checker`` rejects are reported
    as error violations (``invalid_model``, ``external_data``), never raised and never passed.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (not modified).
        target: a profile name (``"tensorrt"``, ...) or a :class:`TargetProfile`.

    Returns:
        Violations in rule order; empty when the file follows the target's rules.

    Raises:
        ProfileError: unknown target.
        FileNotFoundError: ``model`` is a path that does not exist.
        ConfigError: ``model`` is a path to a folder, FIFO or device, or an in-memory model whose
            external tensors cannot be located (pass its path instead).
    """
    profile = get_profile(target)
    findings, model_ir = _read(model)
    head = [Violation(f.rule, f.node, f.message) for f in findings]
    if model_ir is None:
        return head
    found = _run_rules(RuleContext(model_ir, profile), strict=not findings)
    return _dedupe(head, found)


def _read(model: str | os.PathLike[str] | onnx.ModelProto | ir.Model) -> tuple[list[Finding], ir.Model | None]:
    """Validity findings, and the graph to run the rules on (None: unreadable or refused)."""
    path = None
    if isinstance(model, ir.Model):
        proto = ir.to_proto(model)
        findings = external_data_findings(proto, None)
    elif isinstance(model, onnx.ModelProto):
        proto, findings = model, external_data_findings(model, None)
    else:
        path = os.fspath(model)
        proto, findings = read_untrusted(path)
    if proto is None or findings:
        return findings, None  # unparseable, or external data nothing may open
    findings = checker_findings(proto, path)
    if isinstance(model, ir.Model):
        return findings, model
    with quiet_onnx_ir() if findings else contextlib.nullcontext():
        try:
            model_ir = ir.from_proto(proto)
        except Exception as e:
            return [*findings, Finding("invalid_model", "<model>", f"the graph cannot be read ({type(e).__name__}: "
                                       f"{' '.join(str(e).split())[:200]}); re-export the model")], None
    if path is not None:
        ir.external_data.set_base_dir(model_ir.graph, os.path.dirname(os.path.abspath(path)))
    return findings, model_ir


def _run_rules(ctx: RuleContext, strict: bool) -> list[Violation]:
    """Every rule's violations; on an invalid model (``strict=False``) a rule that trips is skipped.

    The rules walk the graph assuming it is valid ONNX; a model that ``onnx.checker`` rejected is
    reported already, so what they still find there is a bonus. A cycle could loop them forever:
    only ``no_quantized_op`` runs on a cyclic graph.
    """
    if not strict and _has_cycle(ctx.graph):
        return list(quantized_ops(ctx))
    found: list[Violation] = []
    for rule in RULES:
        try:
            found.extend(rule(ctx))
        except Exception:
            if strict:
                raise
    return found


def _has_cycle(graph: ir.Graph) -> bool:
    """Kahn's algorithm over every node (subgraphs included), edges from producer to consumer."""
    nodes = list(graph.all_nodes())
    index = {id(n): i for i, n in enumerate(nodes)}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in index:
                users[index[id(producer)]].append(i)
                pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    return seen != len(nodes)


#: rules whose violation already explains an ``onnx.checker`` rejection at the same node.
_EXPLAINS_INVALID = ("opset_per_channel", "int4_opset")


def _dedupe(head: list[Violation], found: list[Violation]) -> list[Violation]:
    """Drop ``invalid_model`` when a more specific rule flags the node the checker complains about."""
    explained = {v.node for v in found if v.rule in _EXPLAINS_INVALID}
    head = [v for v in head if not (v.rule == "invalid_model" and v.node in explained)]
    return [*head, *found]
