"""RenormEmbeddingsPass: an embedding with max_norm deploys what torch computes for any ids (not only the seen ones).

torch renormalizes looked-up rows in place at each forward; the exporters write the plain gather. The file held
the table as the last forward left it, and ORT's output on ids not seen before differed from torch's (0.09-0.18
of the output scale on a small net), with no error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.passes.lower.renorm_embeddings import RenormEmbeddingsPass


class _ModuleForm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8, padding_idx=0, max_norm=1.0), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class _FunctionalForm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.head = nn.Parameter(torch.randn(20, 8) * 2), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(F.embedding(ids, self.table, max_norm=1.5, norm_type=1.0).mean(1))


def _prepared(make, target=None):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, 20, (2, 5))
    qm = qtrim_fx.prepare(model, (ids,), target=target)
    qtrim_fx.calibrate(qm, [(ids,)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval(), ids


@pytest.mark.parametrize("make", [_ModuleForm, _FunctionalForm], ids=["module", "functional"])
def test_lowered_table_is_renormed_in_full_and_the_prepared_model_untouched(make):
    qm, _ = _prepared(make)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    lowered = qtrim_fx.lower(qm, "onnxruntime")
    for k, v in qm.state_dict().items():  # lowering works on a copy
        assert torch.equal(v, before[k]), k
    table = lowered.emb.weight if make is _ModuleForm else lowered.table
    norm_type = 2.0 if make is _ModuleForm else 1.0
    max_norm = 1.0 if make is _ModuleForm else 1.5
    assert float(table.detach().norm(p=norm_type, dim=1).max()) <= max_norm * (1 + 1e-6)
    if make is _ModuleForm:
        assert lowered.emb.max_norm is None
    # lowered == prepared for every id (torch renorms looked-up rows the same way; renorm is idempotent)
    for _ in range(3):
        new = torch.randint(0, 20, (3, 5))
        assert torch.equal(lowered(new), qm(new))
    assert not RenormEmbeddingsPass()(lowered).modified  # idempotent: nothing left with max_norm


@pytest.mark.parametrize("make", [_ModuleForm, _FunctionalForm], ids=["module", "functional"])
@pytest.mark.parametrize("target", ["onnxruntime", "qnn"])
def test_file_matches_torch_on_ids_never_seen(tmp_path, make, target):
    import onnxruntime as ort

    qm, ids = _prepared(make, target)
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (ids,), path, target=target)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    for _ in range(3):
        new = torch.randint(0, 20, (3, 5))
        (out,) = sess.run(None, {sess.get_inputs()[0].name: new.numpy()})
        ref = qm(new).detach().numpy()
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))
