"""A prepared model run under ``torch.inference_mode()`` (evaluation between epochs) then trained again.

Sites cache their qparams against the statistics' version counters; qparams derived under inference mode are
inference tensors, which autograd refuses to save for backward. They are not cached: the next training step
derives its own (and gives the same values and gradients as a model never run under inference mode).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx


@pytest.mark.parametrize("name", ["vit_tiny", "tiny_convnet"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_after_inference_mode_works_and_matches(name, mode):
    model, (x,) = get_model(name, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model)
        qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    ref = copy.deepcopy(qm)
    getattr(qm, mode)()
    getattr(ref, mode)()
    with torch.inference_mode():
        out = qm(x)
    with torch.no_grad():
        assert torch.equal(out, ref(x))  # the same statistics updates (train mode) and values
    grads = []
    for m in (qm, ref):
        m.train()
        xg = x.clone().requires_grad_()
        m(xg).square().sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])
