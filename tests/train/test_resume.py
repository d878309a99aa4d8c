"""Checkpoint / resume: a run stopped mid-ramp and resumed from its checkpoint equals the uninterrupted run.

The checkpoint is what a training script saves: the prepared model's ``state_dict`` (weights,
BatchNorm and site statistics, λ), ``QuantTrim.state_dict()`` (epoch, λ, τ, pinned epochs), the
optimizer's state and the RNG state. Resuming builds everything afresh (new float model, new
``prepare``, new QuantTrim and optimizer) and loads the four states.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.train import checkpoint

STEPS = 3
EPOCHS = 5
STOP = (2, 1)  # epoch 2 of warmup=1 .. ramp_end=3: mid-ramp, after two pins
SEED = 123


def _fresh(config: qtrim_fx.QuantConfig | None = None):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model.train(), config=config)
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(warmup=1, ramp_end=3, horizon=2),
                              qtrim_fx.ReversePruner(p_clip=0.9, every=1), steps_per_epoch=STEPS)
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    return qm, trim, opt, x


def _run(qm, trim, opt, begin=(0, 0), stop=None) -> list[float]:
    """The user's loop; data comes from the global RNG. Stops before step ``stop``."""
    losses = []
    for epoch in range(begin[0], EPOCHS):
        first = begin[1] if epoch == begin[0] else 0
        if first == 0:
            trim.epoch_start(epoch)
        for step in range(first, STEPS):
            if (epoch, step) == stop:
                return losses
            trim.step(step)
            xb, yb = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
            loss = F.cross_entropy(qm(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _export_bytes(qm, x, tmp_path, name: str) -> bytes:
    path = tmp_path / f"{name}.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    return path.read_bytes()


@pytest.mark.parametrize("update_every", [1, 2, 3])
def test_resume_mid_ramp_matches_the_uninterrupted_run(tmp_path, update_every):
    cfg = qtrim_fx.QuantConfig(update_every=update_every)
    torch.manual_seed(SEED)
    qm, trim, opt, x = _fresh(cfg)
    full = _run(qm, trim, opt)
    reference = _export_bytes(qm, x, tmp_path, "uninterrupted")

    torch.manual_seed(SEED)
    qm, trim, opt, x = _fresh(cfg)
    before = _run(qm, trim, opt, stop=STOP)
    assert 0.0 < trim.blend < 0.5 and trim.pinned_epochs == [1, 2]  # mid-ramp
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": qm.state_dict(), "trim": trim.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state(), "position": STOP}, ckpt)
    del qm, trim, opt

    torch.manual_seed(999)  # a new process would start from another RNG state
    qm, trim, opt, x = _fresh(cfg)
    state = torch.load(ckpt)  # weights_only: plain tensors and numbers
    qm.load_state_dict(state["model"])
    trim.load_state_dict(state["trim"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    after = _run(qm, trim, opt, begin=tuple(state["position"]))

    assert before + after == full  # exactly, the next step's loss first
    assert after[0] == full[len(before)]
    assert _export_bytes(qm, x, tmp_path, "resumed") == reference


def _calibrated(lam: float = 0.7):
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x, 2 * x])
    qtrim_fx.set_blend(qm, lam)
    return qm.eval(), x


def test_save_and_load_a_prepared_model_as_a_whole(tmp_path):
    qm, x = _calibrated()
    path = tmp_path / "qm.pt"
    checkpoint.save(qm, path)
    assert [p.name for p in tmp_path.iterdir()] == ["qm.pt"]  # atomic: no temporary file left
    assert torch.load(path, weights_only=True)["format"] == "qtrim_fx.prepared"

    loaded = checkpoint.load(get_model("tiny_convnet")[0], path).eval()
    assert float(loaded.qtrim_blend.value) == pytest.approx(0.7) and not loaded.qtrim_blend.is_zero
    assert all(s.observer.initialized for _, s, _ in qtrim_fx.iter_sites(loaded))
    assert torch.equal(loaded(x), qm(x))
    assert _export_bytes(loaded, x, tmp_path, "a") == _export_bytes(qm, x, tmp_path, "b")


def test_save_keeps_the_config_and_its_overrides(tmp_path):
    cfg = qtrim_fx.QuantConfig(weight_bits=4, overrides=(
        qtrim_fx.Override(name="conv1|fc", weight_bits=8),
        qtrim_fx.Override(module_type=torch.nn.Linear, act_symmetric=True)))
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, config=cfg)
    qtrim_fx.calibrate(qm, [x])
    checkpoint.save(qm, tmp_path / "qm.pt")
    loaded = checkpoint.load(get_model("tiny_convnet")[0], tmp_path / "qm.pt")
    assert loaded.qtrim_info.config == cfg
    bits = {s.name: s.scheme.bits for s, _, _ in qtrim_fx.iter_sites(loaded) if s.kind == "weight"}
    assert bits == {"conv1.weight": 8, "conv2.weight": 4, "fc.weight": 8}


def test_torch_save_of_the_whole_prepared_module_round_trips(tmp_path):
    qm, x = _calibrated()
    buf = io.BytesIO()
    torch.save(qm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [s.name for s, _, _ in qtrim_fx.iter_sites(loaded)] == [s.name for s, _, _ in qtrim_fx.iter_sites(qm)]
    assert "_tensor_constant" not in loaded.code  # the BatchNorm fold factor stays a live computation
    assert torch.equal(loaded(x), qm(x))
    assert _export_bytes(loaded, x, tmp_path, "a") == _export_bytes(qm, x, tmp_path, "b")
    # Training goes on: BatchNorm statistics still reach the weight sites.
    loaded.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(3 * x)
    loaded.eval()
    assert not torch.equal(loaded(x), qm(x))
