"""Prepare time: qtrim_fx.prepare vs torch.ao prepare_qat_fx on the same models, in one run.

    python benchmarks/prepare_time.py [--repeat 5] [--models resnet50,vit_b_16] [--hf-repeat 3] [--no-write]

The second table splits ``prepare`` on the ``torch.export`` front end (a Hugging Face BERT with the
MiniLM-L6 shape: 6 layers, hidden 384, 12 heads, built from its config) into ``torch.export`` itself
(the same call on the same inputs, timed alone) and our share (everything else ``prepare`` does).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, write_section

import qtrim_fx


def _ao_prepare(model: torch.nn.Module, example: torch.Tensor) -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def _minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    ids = torch.randint(0, 1000, (2, 16))
    return BertModel(cfg).train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _export_alone(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    auto = torch.export.Dim.AUTO
    shapes = {k: dict.fromkeys(range(v.dim()), auto) for k, v in inputs.items()}
    torch.export.export(model, (), inputs, dynamic_shapes=shapes, strict=False)


def _hf_table(repeat: int) -> str:
    """Interleaved rounds (export alone, then prepare) so that load on a shared machine hits both alike."""
    model, inputs = _minilm()
    _export_alone(model, inputs)  # warm-up: first-call imports and caches
    exports, prepares = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        _export_alone(model, inputs)
        exports.append(time.perf_counter() - t)
        t = time.perf_counter()
        qtrim_fx.prepare(model, inputs)
        prepares.append(time.perf_counter() - t)
    export, ours = statistics.median(exports), statistics.median(prepares)
    share = max(ours - export, 0.0) / ours
    return ("| model | torch.export alone (s) | qtrim_fx.prepare (s) | our share |\n|---|---|---|---|\n"
            f"| BERT 6x384 (MiniLM-L6 shape) | {export:.2f} | {ours:.2f} | {share:.0%} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    ap.add_argument("--hf-repeat", type=int, default=3, help="repeats of the torch.export front-end table (0: skip)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = getattr(torchvision.models, name)().train()
        example = torch.randn(1, 3, 224, 224)
        trace = median_time(lambda m=model: torch.fx.symbolic_trace(m), args.repeat)
        ours = median_time(lambda m=model: qtrim_fx.prepare(m), args.repeat)
        # prepare_qat_fx works on its own copy; time the copy separately and subtract it.
        copy_t = median_time(lambda m=model: copy.deepcopy(m), args.repeat)
        theirs = median_time(lambda m=model, e=example: _ao_prepare(m, e), args.repeat) - copy_t
        rows.append((name, trace, ours, theirs, ours / theirs))
    head = "| model | symbolic_trace (s) | qtrim_fx.prepare (s) | torch.ao prepare_qat_fx (s) | ours / theirs |"
    lines = [head, "|---|---|---|---|---|"]
    lines += [f"| {n} | {t:.3f} | {o:.3f} | {a:.3f} | {r:.2f}x |" for n, t, o, a, r in rows]
    table = "\n".join(lines)
    if args.hf_repeat > 0:
        table += f"\n\nOn the torch.export front end (medians of {args.hf_repeat} runs):\n\n"
        table += _hf_table(args.hf_repeat)
    print(table)
    if not args.no_write:
        cmd = "python benchmarks/prepare_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(
            "Prepare time (issue: prepare)",
            f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \nMedians of {args.repeat} runs, same process; "
            "prepare_qat_fx uses the default x86 QAT qconfig mapping (its internal deepcopy time is "
            "subtracted). Goal: ours <= 0.5x theirs.\n\n" + table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
