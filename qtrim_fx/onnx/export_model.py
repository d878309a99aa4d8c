"""``qtrim_fx.export_onnx``: prepared model -> clean QDQ ONNX for one target (lower + export + ONNX passes)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.errors import ExportError, ProfileError, QtrimWarning
from qtrim_fx.core.fileio import check_output_path
from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.onnx.export import EXPORTERS, export_lowered
from qtrim_fx.passes.lower.api import lower
from qtrim_fx.passes.lower.require_opset import default_opset
from qtrim_fx.runtime.prepared import prepared_target, unwrap

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    target: str | TargetProfile | None = None,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    exporter: str = EXPORTERS[0],
) -> onnx.ModelProto:
    """Write a standard QuantizeLinear/DequantizeLinear ONNX file of a prepared model for ``target``.

    BatchNorm is folded, every site becomes Q/DQ with qparams derived from its stored statistics
    for the target's grid, weights are stored as int8/int4 initializers + DequantizeLinear, and the
    file is checked against the target's rules before it is (atomically) written.

    Args:
        model: a prepared model that has been calibrated or trained (every site has statistics).
        example_inputs: positional inputs (tuple or tensor) for tracing, or a dict of keyword inputs
            by the forward's argument names (as ``prepare`` takes them).
        path: output ``.onnx`` path. Written atomically; a symlink is followed (its target is
            replaced, the link stays); an existing file keeps its mode, a new one gets the umask's.
        target: ``onnxruntime``, ``tensorrt``, ``openvino``, ``qnn``, ``npu`` or a TargetProfile; None (default):
            the target the model was prepared for (``prepare(..., target=...)``), else ``onnxruntime``.
        opset: the ONNX opset; None: the target's, raised to the oldest that writes the model as trained,
            within the target's ``max_opset`` (INT4 weights: 21, attention: 14, LayerNorm on an integer-only
            target: 17).
        input_names, output_names: ONNX graph input/output names.
        dynamic_batch: symbolic batch dimension on inputs and outputs.
        exporter: ``"auto"`` (default), ``"dynamo"`` (``torch.onnx.export(dynamo=True)``: torch.export +
            onnxscript; the dims a ``torch.export`` capture kept symbolic, e.g. ``sequence``, stay dynamic
            too) or ``"torchscript"`` (the legacy exporter torch deprecates; batch only). ``"auto"`` takes
            dynamo for models captured by ``torch.export`` and torchscript (same file, faster) otherwise.
        verify: run the written file on ONNX Runtime against the lowered model on ``example_inputs``
            and refuse (``ExportError``, file removed) when they disagree beyond rounding.

    Returns:
        The written ``onnx.ModelProto``.

    Raises:
        TypeError: ``example_inputs`` are not tensors (or not as many as the forward takes).
        ProfileError: unknown target, or one the sites cannot be exported to (INT4 below opset 21, ...).
        ExportError: sites without statistics (calibrate first), inputs the model cannot run on,
            or a result that breaks the target's rules. No file is written on any error.
        OutputPathError: ``path`` is a directory, FIFO, device or socket, or a read-only file
            (checked before the export starts).
    """
    check_output_path(path)  # a bad output path fails before the (slow) lowering and export
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {', '.join(map(repr, EXPORTERS))}")
    model = unwrap(model)
    if target is None:
        target = prepared_target(model) or "onnxruntime"
    profile = get_profile(target)
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int):
            raise ProfileError(f"opset must be an int such as 17 or 21, got {opset!r}")
        profile = profile.replace(opset=opset)
    _warn_partial_blend(model)
    if opset is None:
        profile = default_opset(model, profile)
    args = _positional_inputs(model, example_inputs)
    _check_example_values(args)
    _check_names(input_names, output_names, sum(isinstance(a, torch.Tensor) for a in args))
    gm = lower(model, profile, opset=profile.opset)  # the opset chosen above (lower would pick its own)
    _dry_run(gm, args, model, profile.name)
    if verify:  # leaves branching on tensor values would export one branch (qtrim_fx.onnx.self_check)
        from qtrim_fx.onnx.self_check import refuse_value_branches, verify_export

        refuse_value_branches(model, gm)
    written = export_lowered(gm, args, path, profile, input_names, output_names, dynamic_batch, exporter,
                             opset_floor=opset is None)
    if verify:  # the file, on ONNX Runtime, against the lowered model
        verify_export(gm, args, path)
    return written


def _check_example_values(args: tuple[Any, ...]) -> None:
    """Refuse example inputs holding NaN: the export checks the file against the model on them, and NaN has no
    integer code (runtimes saturate it, torch keeps it), so the check would fail on a sound file. (±inf stays
    allowed: an additive attention mask is legitimate data.)"""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel():
            bad = int(torch.isnan(a).sum())
            if bad:
                raise ExportError(f"example input #{i} holds {bad} NaN value(s) of {a.numel()}; the export runs the "
                                  "model and the file on the example inputs: pass real data (one batch of your "
                                  "inputs)")


def _check_names(input_names: Any, output_names: Any, num_inputs: int) -> None:
    """Graph input / output names: lists of distinct non-empty strings, no more input names than inputs.

    A bare string would be taken character by character by the exporter (``"logits"`` names the output ``l``),
    extra input names are dropped and a name used twice is renamed (``y.1``), each without a word.
    """
    given = []
    for what, names in (("input_names", input_names), ("output_names", output_names)):
        if names is None:
            continue
        if isinstance(names, str) or not isinstance(names, list | tuple) or not all(
                isinstance(n, str) and n for n in names):
            raise ExportError(f"{what} must be a list of non-empty strings, e.g. {what}=['x'], got {names!r}")
        given += list(names)
    if input_names is not None and len(input_names) > num_inputs:
        raise ExportError(f"input_names has {len(input_names)} names ({', '.join(input_names)}) but the model takes "
                          f"{num_inputs} tensor input(s) here; give one name per input")
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ExportError(f"graph input / output name(s) {', '.join(twice)} given twice; ONNX names each tensor once")


def _warn_partial_blend(model: nn.Module) -> None:
    """A :class:`QtrimWarning` when the model's blend λ lies strictly between 0 and 1 (mid-curriculum).

    The file always quantizes fully (λ = 1). At λ = 0 (post-training quantization right after ``calibrate``)
    and at λ = 1 (the end of the curriculum) that is what the user meant; in between the model in hand
    computes a blend the file does not, so the file's accuracy is not the training loop's.
    """
    control = getattr(model, "qtrim_blend", None)
    if control is None or control.is_zero or control.is_one:
        return
    warnings.warn(QtrimWarning(
        f"export_onnx at blend λ = {control.get():.3g}: the file quantizes every site fully (λ = 1), which this "
        "model has not been trained as, so its accuracy is the file's, not the training loop's; finish the "
        "curriculum (λ = 1), or qtrim_fx.set_blend(model, 1.0) and evaluate the model before exporting"),
        stacklevel=3)


def _from_keywords(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Keyword example inputs (``{"input_ids": ids, ...}``, as ``prepare`` takes them) in forward order.

    An input left out takes its default (``None`` for the optional inputs of Hugging Face models).
    """
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        raise TypeError("export_onnx takes keyword example inputs only for a prepared model; pass a tuple")
    places = [n for n in graph.nodes if n.op == "placeholder"]
    names = [str(n.target).lstrip("*") for n in places]
    unknown = [k for k in inputs if k not in names]
    if unknown:
        raise TypeError(f"example input(s) {unknown} are not inputs of the model's forward ({', '.join(names)}); "
                        "pass the forward's argument names as keys")
    last = max((names.index(k) for k in inputs), default=-1)
    return tuple(inputs[name] if name in inputs else (n.args[0] if n.args else None)
                 for name, n in zip(names[: last + 1], places, strict=False))


def _positional_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as a tuple, checked against the forward's inputs before the (slow) lowering."""
    if isinstance(example_inputs, Mapping):
        example_inputs = _from_keywords(model, example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"export_onnx example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__name__}; e.g. export_onnx(qm, (x,), path)")
    for i, a in enumerate(example_inputs):
        if not (a is None or isinstance(a, (torch.Tensor, bool, int, float))):
            raise TypeError(f"example input #{i} is a {type(a).__module__}.{type(a).__qualname__}; export_onnx "
                            "takes torch tensors: convert it with torch.as_tensor(...)")
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
        required = [n.name for n in graph.nodes if n.op == "placeholder" and not n.args]
        if not len(required) <= len(example_inputs) <= len(names):
            raise TypeError(f"the model's forward takes {len(required)} input(s) ({', '.join(names)}) but "
                            f"export_onnx got {len(example_inputs)} example input(s); pass one tensor per input")
    return tuple(example_inputs)


def _dry_run(gm: nn.Module, args: tuple[Any, ...], prepared: nn.Module | None = None, target: str = "") -> None:
    """Run the lowered model once so wrong shapes or dtypes fail here, with the fix, not inside the exporter.

    When it fails, the error says why as far as it can tell: inputs or weights that are not float32 (the files
    are float32 models), a lowered graph that fails where the prepared model runs (a lowering defect, not the
    user's inputs), or inputs the model itself does not take.
    """
    try:
        with torch.no_grad():
            gm(*args)
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        wide = sorted({str(t.dtype).removeprefix("torch.") for t in (*args, *gm.parameters())
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32})
        if wide:
            raise ExportError(
                f"the lowered model does not run ({why}) and holds {', '.join(wide)} inputs or weights; the exported "
                "files are float32 models: call model.float() and pass float32 example inputs before export_onnx"
            ) from e
        if prepared is not None and _runs(prepared, args):
            raise ExportError(
                f"the model lowered for target {target!r} does not run on the example inputs ({why}) although the "
                "prepared model does: a qtrim_fx lowering defect, not your inputs; please report it with the model "
                "(qtrim_fx.lower(model, target) reproduces it)"
            ) from e
        raise ExportError(
            f"the model does not run on the example inputs ({why}); pass inputs with the shapes and dtypes its "
            f"forward expects, e.g. one batch of your data (got {_describe(args)})"
        ) from e


def _runs(model: nn.Module, args: tuple[Any, ...]) -> bool:
    """Whether ``model`` runs on ``args`` in eval mode (no statistics, BatchNorm or RNG state touched)."""
    modes = [(m, m.training) for m in model.modules()]  # per module: a BatchNorm frozen in eval stays so
    try:
        with torch.no_grad():
            model.eval()(*args)
        return True
    except Exception:
        return False
    finally:
        for m, training in modes:
            m.training = training


def _describe(args: tuple[Any, ...]) -> str:
    return ", ".join(f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)
