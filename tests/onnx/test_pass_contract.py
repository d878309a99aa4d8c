"""The pass contract of every ONNX pass of ``qdq_passes(profile)``, checked the same way for each.

Each pass runs on the model it meets in the export pipeline (a raw ``torch.onnx`` export of the
hand-lowered models of :mod:`tests.onnx.qdq_models`, run through the passes before it), for every
target profile:

* ``modified`` is truthful: it is True exactly when the serialized model changed;
* the result is a valid ONNX model (``onnx.checker``);
* it is idempotent: run again on its own output it reports ``modified=False`` and changes nothing;
* on a model it does not match (plain float ops) it reports ``modified=False`` and changes nothing.

:mod:`tests.onnx.test_passes` checks what each pass rewrites on hand-made graphs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtrim_fx.onnx
from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.onnx.expand_placeholders import ExpandPlaceholdersPass
from qtrim_fx.onnx.export import _torch_export, qdq_passes
from qtrim_fx.onnx.finalize import FinalizeModelPass
from qtrim_fx.onnx.fold_weight_layout import FoldWeightLayoutPass
from qtrim_fx.onnx.fuse_gelu import FuseGeluPass
from qtrim_fx.onnx.gather_table_qdq import QuantizeGatherTablePass
from qtrim_fx.onnx.merge_qdq import MergeDuplicateQDQPass
from qtrim_fx.onnx.name_after_sites import NameAfterSitesPass
from qtrim_fx.onnx.quantize_bias import QuantizeBiasPass
from qtrim_fx.onnx.quantize_instance_norm import QuantizeInstanceNormPass
from qtrim_fx.onnx.quantize_scalar_operands import QuantizeScalarOperandsPass
from qtrim_fx.onnx.requantize_shape_ops import RequantizeAfterShapeOpsPass
from qtrim_fx.onnx.unsigned_weights import UnsignedWeightsPass
from tests.onnx.qdq_models import convnet, token_mixer, upsampler

PROFILES = ("onnxruntime", "onnxruntime_avx2", "tensorrt", "qnn", "openvino", "npu")
FACTORIES = {"convnet": convnet, "token_mixer": token_mixer, "upsampler": upsampler}

#: how to build each pass for a profile
PASSES: dict[str, Callable[[TargetProfile], ir.passes.PassBase]] = {
    "ExpandPlaceholdersPass": ExpandPlaceholdersPass,
    "FoldWeightLayoutPass": lambda _: FoldWeightLayoutPass(),
    "MergeDuplicateQDQPass": lambda _: MergeDuplicateQDQPass(),
    "FuseGeluPass": FuseGeluPass,
    "QuantizeGatherTablePass": QuantizeGatherTablePass,
    "RequantizeAfterShapeOpsPass": lambda _: RequantizeAfterShapeOpsPass(),
    "QuantizeBiasPass": QuantizeBiasPass,
    "QuantizeInstanceNormPass": QuantizeInstanceNormPass,
    "QuantizeScalarOperandsPass": QuantizeScalarOperandsPass,
    "UnsignedWeightsPass": UnsignedWeightsPass,
    "NameAfterSitesPass": lambda _: NameAfterSitesPass(),
    "FinalizeModelPass": FinalizeModelPass,
}

#: where each pass has work to do in the pipeline (model, profiles); elsewhere it may or may not.
APPLIES = [
    *(("ExpandPlaceholdersPass", m, p) for m in FACTORIES for p in PROFILES),  # every raw export has placeholders
    *(("FinalizeModelPass", m, p) for m in FACTORIES for p in PROFILES),  # drops the qtrim opset import
    *(("NameAfterSitesPass", m, p) for m in FACTORIES for p in PROFILES),  # exporter names next to sites
    # the int32-bias target; token_mixer's 3-D linears export as MatMul + Add, whose bias stays float
    ("QuantizeBiasPass", "convnet", "qnn"),
    ("QuantizeBiasPass", "upsampler", "qnn"),
    *(("UnsignedWeightsPass", m, "onnxruntime_avx2") for m in FACTORIES),  # int8 weights -> uint8 around 128
    *(("FoldWeightLayoutPass", "token_mixer", p) for p in PROFILES),  # Transpose of a weight before a 3-D MatMul
    *(("RequantizeAfterShapeOpsPass", "convnet", p) for p in PROFILES),  # pool.out -> Flatten -> Gemm
    # MergeDuplicateQDQPass has nothing to merge in these exports; tests/onnx/test_passes.py has graphs it merges.
    # FuseGeluPass finds no GELU in these models; tests/onnx/test_fuse_gelu.py has graphs it fuses.
    # QuantizeGatherTablePass finds no lookup; tests/onnx/test_gather_table.py has graphs it rewrites.
    # QuantizeInstanceNormPass finds no GroupNorm; tests/onnx/test_quantize_instance_norm.py has files it rewrites.
]


@functools.cache
def _raw(factory: str, profile: str) -> bytes:
    prof = get_profile(profile)
    gm, args = FACTORIES[factory](prof)
    return _torch_export(gm, args, prof, ["x"], ["output"], True).SerializeToString()


@functools.cache
def _stage(name: str, factory: str, profile: str) -> bytes:
    """The model the pass ``name`` receives inside ``qdq_passes(profile)`` for ``factory``."""
    prof = get_profile(profile)
    model = ir.from_proto(onnx.load_model_from_string(_raw(factory, profile)))
    for p in qdq_passes(prof).passes:
        if type(p).__name__ == name:
            return _bytes(model)
        model = p(model).model
    raise AssertionError(f"{name} is not in qdq_passes({profile!r})")


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def _run(name: str, profile: str, data: bytes) -> tuple[bool, bytes]:
    model = ir.from_proto(onnx.load_model_from_string(data))
    before = _bytes(model)  # through the IR once, as the pass sees it
    result = PASSES[name](get_profile(profile))(model)
    after = _bytes(result.model)
    assert result.modified == (after != before), (
        f"{name} reported modified={result.modified} but the model {'changed' if after != before else 'did not'}")
    onnx.checker.check_model(onnx.load_model_from_string(after))
    return result.modified, after


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("name", PASSES)
def test_pass_is_truthful_valid_and_idempotent_in_the_pipeline(name, factory, profile):
    modified, out = _run(name, profile, _stage(name, factory, profile))
    if (name, factory, profile) in APPLIES:
        assert modified, f"{name} found nothing to do on {factory} for {profile}"
    again, out2 = _run(name, profile, out)
    assert not again and out2 == out, f"{name} is not idempotent on {factory} for {profile}"


def _plain(profile: TargetProfile) -> bytes:
    """Float Conv -> Relu -> Flatten -> Gemm with biases: no placeholder, no Q/DQ, standard opset only."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": np.zeros(4, np.float32),
             "fw": rng.standard_normal((2, 4 * 6 * 6)).astype(np.float32), "fb": np.zeros(2, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", profile.opset)])
    model.ir_version = profile.ir_version
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("profile", ["onnxruntime", "qnn"])
@pytest.mark.parametrize("name", PASSES)
def test_pass_leaves_a_plain_float_model_alone(name, profile):
    data = _plain(get_profile(profile))
    modified, out = _run(name, profile, data)
    assert not modified
    assert out == _bytes(ir.from_proto(onnx.load_model_from_string(data)))


def test_the_contract_covers_every_onnx_pass_of_the_pipeline():
    found = set()
    for info in pkgutil.walk_packages(qtrim_fx.onnx.__path__, "qtrim_fx.onnx."):
        module = importlib.import_module(info.name)
        found |= {
            cls.__name__ for cls in vars(module).values()
            if inspect.isclass(cls) and issubclass(cls, ir.passes.PassBase) and cls.__module__ == module.__name__
        }
    # the dynamo exporter's normalizers run before the QDQ pipeline, on the raw torchlib file; their
    # contract is tests/onnx/test_dynamo_export.py (same file as the TorchScript exporter's)
    assert found == set(PASSES) | {"LegacyNamesPass", "LegacyPoolingFormsPass"}
    ours = {type(p).__name__ for p in qdq_passes(get_profile("onnxruntime")).passes} & found
    assert ours == set(PASSES)
