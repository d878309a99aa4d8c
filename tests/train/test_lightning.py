"""QuantTrimCallback: a tiny Lightning run (CPU, 2 epochs, 3 batches) drives λ and pruning; checkpoints resume it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from qtrim_fx.models import get_model
from torch.utils.data import DataLoader, TensorDataset

import qtrim_fx

L = pytest.importorskip("lightning")

from qtrim_fx.train.lightning import QuantTrimCallback  # noqa: E402

CURRICULUM = qtrim_fx.Curriculum(warmup=0, ramp_end=2, horizon=1)
BATCHES = 3


class _Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = qtrim_fx.prepare(get_model("tiny_mlp")[0].train(),
                                   config=qtrim_fx.QuantConfig(update_every=1))  # one update per step
        self.blends: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.blends.append(float(self.net.qtrim_blend.value))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * BATCHES, 64, generator=g), torch.randint(0, 10, (8 * BATCHES,), generator=g))
    return DataLoader(data, batch_size=8)


def _fit(lit, cb, epochs: int, root, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers, log_every_n_steps ...
        trainer.fit(lit, _loader(), ckpt_path=ckpt_path)
    return trainer


def test_callback_drives_quant_trim_and_resumes_from_a_checkpoint(tmp_path):
    lit, cb = _Lit(), QuantTrimCallback(CURRICULUM, qtrim_fx.ReversePruner(p_clip=0.9, every=1), per_step=True)
    trainer = _fit(lit, cb, 2, tmp_path)
    assert lit.blends == pytest.approx([CURRICULUM(e + b / BATCHES) for e in range(2) for b in range(BATCHES)])
    assert cb.trim.epoch == 1 and cb.trim.pinned_epochs == [0, 1]
    assert all(int(s.observer.num_updates) == 2 * BATCHES for _, s, _ in qtrim_fx.iter_sites(lit.net))

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]["QuantTrimCallback"]
    assert saved["epoch"] == 1 and len(saved["pruner"]["thresholds"]) == 3

    lit2 = _Lit()
    cb2 = QuantTrimCallback(CURRICULUM, qtrim_fx.ReversePruner(p_clip=0.9, every=1), per_step=True)
    _fit(lit2, cb2, 3, tmp_path, ckpt_path=path)
    assert lit2.blends == pytest.approx([CURRICULUM(2 + b / BATCHES) for b in range(BATCHES)])  # epoch 2 only
    assert cb2.trim.pinned_epochs == [0, 1, 2] and cb2.trim.pruner.num_updates == 3
    assert all(int(s.observer.num_updates) == 3 * BATCHES for _, s, _ in qtrim_fx.iter_sites(lit2.net))


def test_callback_per_epoch_lambda_and_clear_error_without_a_prepared_model(tmp_path):
    lit, cb = _Lit(), QuantTrimCallback(CURRICULUM)
    _fit(lit, cb, 2, tmp_path)
    assert lit.blends == [CURRICULUM(0)] * BATCHES + [CURRICULUM(1)] * BATCHES

    class Plain(_Lit):
        def __init__(self) -> None:
            super().__init__()
            self.net = get_model("tiny_mlp")[0]

    with pytest.raises(qtrim_fx.SchemeError, match=r"found 0 prepared models in Plain.*qtrim_fx\.prepare"):
        _fit(Plain(), QuantTrimCallback(CURRICULUM), 1, tmp_path)
