"""Export time: the TorchScript exporter vs the dynamo exporter (torch.export + onnxscript), same run.

    python benchmarks/export_time.py [--repeat 3] [--models tv_resnet18,vit_tiny,bert2] [--quick] [--no-write]

Per model (prepared, calibrated, lowered once for ``onnxruntime``) the median wall time of
``export_lowered`` (raw export + QDQ passes + checks + write) with ``exporter="torchscript"`` and
``exporter="dynamo"``, and the dynamo side split into its raw export (``torch.export``, decompositions,
onnxscript translation, our shape clean-up) and the rest. ``first dynamo`` is the first export in the
process (torchlib's operator registry is built then: qtrim_fx caches it per opset, where a plain
``torch.onnx.export(dynamo=True)`` rebuilds it on every call; ``public API`` times that plain call on the
same module, for comparison). ``bert2`` is a 2-layer BERT (hidden 128, 2 heads) through the
``torch.export`` front end, batch 2 x sequence 16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section

import qtrim_fx
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.dynamo_export import _QDQ_OVERLOAD, _translate, export_dynamo, with_custom_op
from qtrim_fx.onnx.export import _io_names, export_lowered
from qtrim_fx.passes.lower.api import lower


def _bert2() -> tuple[torch.nn.Module, tuple]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=256, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 1000, (2, 16))
    return model, ({"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)},)


def _lowered(name: str):
    from qtrim_fx.models import get_model

    from qtrim_fx.onnx.export_model import _positional_inputs

    if name == "bert2":
        model, (kw,) = _bert2()
        qm = qtrim_fx.prepare(model, example_inputs=kw)
        qtrim_fx.calibrate(qm, [kw])
        inputs = kw
    else:
        model, inputs = get_model(name)
        qm = qtrim_fx.prepare(model)
        qtrim_fx.calibrate(qm, [inputs])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    from qtrim_fx.runtime.prepared import unwrap

    args = _positional_inputs(unwrap(qm), inputs)
    return lower(qm, "onnxruntime"), args


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _public_api(gm, args, prof, ins, outs) -> None:
    dims = tuple({0: "batch"} if isinstance(a, torch.Tensor) else None for a in args)
    torch.onnx.export(with_custom_op(gm), args, dynamo=True, opset_version=max(18, prof.opset), input_names=ins,
                      output_names=outs, dynamic_shapes=dims, custom_translation_table={_QDQ_OVERLOAD: _translate},
                      optimize=True, verbose=False)


def measure(name: str, repeat: int, tmp: Path, first: bool) -> dict[str, float]:
    gm, args = _lowered(name)
    prof = get_profile("onnxruntime")
    ins, outs = _io_names(gm, args, None, None)
    row: dict[str, float] = {}
    if first:  # the process's first dynamo export: registry build included
        row["first"] = _time(lambda: export_lowered(gm, args, tmp / "d.onnx", prof, exporter="dynamo"), 1)[0]
    else:
        export_lowered(gm, args, tmp / "d.onnx", prof, exporter="dynamo")
    export_lowered(gm, args, tmp / "t.onnx", prof, exporter="torchscript")  # warm both
    row["torchscript"] = statistics.median(
        _time(lambda: export_lowered(gm, args, tmp / "t.onnx", prof, exporter="torchscript"), repeat))
    row["dynamo"] = statistics.median(
        _time(lambda: export_lowered(gm, args, tmp / "d.onnx", prof, exporter="dynamo"), repeat))
    row["raw"] = statistics.median(_time(lambda: export_dynamo(gm, args, prof, ins, outs, True), repeat))
    if first:  # plain torch.onnx.export(dynamo=True, optimize=True): registry rebuilt, whole optimizer
        row["public"] = statistics.median(_time(lambda: _public_api(gm, args, prof, ins, outs), repeat))
    return row


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | torchscript s | dynamo s | ratio | dynamo raw export s | first dynamo s | public API s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        first = f"{r['first']:.2f}" if "first" in r else "-"
        public = f"{r['public']:.2f}" if "public" in r else "-"
        lines.append(f"| {name} | {r['torchscript']:.2f} | {r['dynamo']:.2f} | {r['dynamo'] / r['torchscript']:.1f}x "
                     f"| {r['raw']:.2f} | {first} | {public} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="tv_resnet18,vit_tiny,bert2")
    ap.add_argument("--quick", action="store_true", help="tiny_convnet once, nothing written (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    models = ["tiny_convnet"] if args.quick else args.models.split(",")
    repeat = 1 if args.quick else args.repeat
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(models):
            rows[name] = measure(name, repeat, Path(tmp), first=i == 0)
            print(f"{name}: {rows[name]}", file=sys.stderr)
    text = table(rows)
    print(text)
    if not (args.quick or args.no_write):
        cmd = f"python benchmarks/export_time.py --repeat {repeat} --models {','.join(models)}"
        write_section("Export time: TorchScript vs dynamo exporter", f"`{cmd}` on {machine()}; medians of "
                      f"{repeat}, seconds, target onnxruntime, dynamic batch.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
