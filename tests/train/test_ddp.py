"""DistributedDataParallel: 2 CPU ranks (gloo) fed different data stay identical.

One spawn runs every scenario in order (starting processes costs most of the time); each
scenario returns plain tensors that the tests below compare across ranks:

* ``train``: QuantTrim (Curriculum + ReversePruner, per-step λ) drives a DDP-wrapped prepared
  model; site statistics, λ, τ, weights and the exported ONNX bytes agree on both ranks.
* ``calibrate``: ranks with different numbers of batches, one of them empty, calibrate
  without waiting on each other and end with the same statistics (unclipped output sites: the
  min / max over both ranks' batches).
* ``nonfinite``: NaN on rank 1 only: statistics stay finite and identical, rank 1 warns naming
  the site (its count is not overwritten by DDP's broadcast of rank 0's buffers).
* ``rank0_load``: a checkpoint (model and QuantTrim state) loaded on rank 0 only: DDP broadcasts
  the model's buffers, ``epoch_start`` re-aligns rank 1's host-side counters and gives it rank 0's
  pruner state, so both ranks pin to the same τ and quantize alike.
"""

from __future__ import annotations

import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from qtrim_fx.models import get_model
from torch.nn.parallel import DistributedDataParallel as DDP

import qtrim_fx
from qtrim_fx.runtime.bias_shift import bias_shifts
from qtrim_fx.runtime.nonfinite import NonFiniteWarning

WORLD = 2
STEPS_PER_EPOCH = 3
EPOCHS = 4
DEADLINE_S = 110  # the whole spawn (a few seconds alone; a loaded machine is much slower)
COLLECTIVE_TIMEOUT = timedelta(seconds=80)  # a stuck collective fails the worker before the deadline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_stats(qm) -> dict[str, torch.Tensor]:
    out = {}
    for spec, site, _ in qtrim_fx.iter_sites(qm):
        o = site.observer
        out[spec.name] = torch.cat([o.lo.reshape(-1), o.hi.reshape(-1), o.num_updates.reshape(1).double()])
    return out


def _scenario_train(rank: int, out: Path) -> dict:
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model.train())
    ddp = DDP(qm)
    trim = qtrim_fx.QuantTrim(ddp, qtrim_fx.Curriculum(warmup=1, ramp_end=2, horizon=2),
                              qtrim_fx.ReversePruner(p_clip=0.9, every=1), steps_per_epoch=STEPS_PER_EPOCH)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
    local_hi = []
    for epoch in range(EPOCHS):
        trim.epoch_start(epoch)
        for step in range(STEPS_PER_EPOCH):
            trim.step(step)
            xb = torch.randn(4, 3, 16, 16, generator=g) * (1 + 2 * rank)
            yb = torch.randint(0, 10, (4,), generator=g)
            local_hi.append(float(torch.quantile(xb.flatten(), 0.999)))
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # A validation pass through the wrapper: DDP broadcasts rank 0's BatchNorm statistics before it
    # (each rank's last training step updated its own).
    ddp.eval()
    with torch.no_grad():
        ddp(x)
    qtrim_fx.export_onnx(qm, (x,), out / f"train_rank{rank}.onnx")
    return {
        "sites": _site_stats(qm),
        "lam": torch.tensor([trim.blend, float(qm.qtrim_blend.value)]),
        "tau": [t.clone() for t in trim.thresholds],
        "pinned": torch.tensor(trim.pinned_epochs),
        "state": {k: v.clone() for k, v in qm.state_dict().items() if not k.endswith("nonfinite")},
        "local_input_hi": torch.tensor(local_hi).mean(),
    }


def _scenario_calibrate(rank: int) -> dict:
    model, (_x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    g = torch.Generator().manual_seed(2000 + rank)
    if rank == 0:  # three batches, the middle one empty
        batches = [torch.randn(4, 64, generator=g), torch.zeros(0, 64), torch.randn(4, 64, generator=g)]
    else:  # five batches, larger values
        batches = [3 * torch.randn(4, 64, generator=g) for _ in range(5)]
    used = qtrim_fx.calibrate(qm, batches)
    with torch.no_grad():  # λ = 0: the float outputs of the batches this rank calibrated on (3 on both)
        ys = torch.cat([qm.eval()(b) for b in batches[:3] if len(b)])
    return {"used": torch.tensor(used), "sites": _site_stats(qm),
            "outputs": {s.name: torch.stack([site.observer.lo, site.observer.hi])
                        for s, site, _ in qtrim_fx.iter_sites(qm) if not site.observer.clip},
            "extremes": torch.stack([ys.min(), ys.max()]),
            "bias_shifts": {k: m.delta.clone() for k, m in bias_shifts(qm).items()}}


def _scenario_nonfinite(rank: int) -> dict:
    model, (_x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model.train(), config=qtrim_fx.QuantConfig(update_every=1))  # every call observes
    ddp = DDP(qm)
    trim = qtrim_fx.QuantTrim(ddp, qtrim_fx.Curriculum(warmup=0, ramp_end=1, horizon=1))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3000 + rank)

    def train_step() -> None:
        loss = ddp(torch.randn(4, 64, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    trim.epoch_start(0)
    train_step()
    bad = torch.randn(4, 64, generator=g)
    if rank == 1:
        bad[0, :5] = float("nan")
        bad[1, 0] = float("inf")
    with torch.no_grad():  # statistics update (train mode); no NaN gradients
        ddp(bad)
    train_step()
    train_step()  # its forward broadcasts rank 0's buffers (the count of rank 1 must survive it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trim.epoch_start(1)
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    return {"sites": _site_stats(qm), "warned": messages}


def _scenario_rank0_load(rank: int, out: Path) -> dict:
    model, (x,) = get_model("tiny_mlp")
    cur = qtrim_fx.Curriculum(warmup=0, ramp_end=1, horizon=1)

    def pruner() -> qtrim_fx.ReversePruner:
        return qtrim_fx.ReversePruner(p_clip=0.9, every=1, momentum=0.5)

    if rank == 0:  # the "previous run": calibrated, two epochs of λ and pruning, saved on rank 0
        qm = qtrim_fx.prepare(model)
        qtrim_fx.calibrate(qm, [x, 2 * x], distributed=False)
        trim = qtrim_fx.QuantTrim(qm, cur, pruner(), distributed=False)
        for epoch in range(2):
            trim.epoch_start(epoch)
            with torch.no_grad():
                for w in trim.weights():
                    w.mul_(1.5)  # training moves the weights on after each pin
        torch.save({"model": qm.state_dict(), "trim": trim.state_dict()}, out / "rank0_ckpt.pt")
    dist.barrier()
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    trim = qtrim_fx.QuantTrim(qm, cur, pruner())
    if rank == 0:  # the mistake: only rank 0 loads; DDP's constructor broadcasts the model's buffers
        ckpt = torch.load(out / "rank0_ckpt.pt")
        qm.load_state_dict(ckpt["model"])
        trim.load_state_dict(ckpt["trim"])
    ddp = DDP(qm)
    trim.epoch_start(2)  # pins the weights: to the same τ on both ranks
    qm.eval()
    with torch.no_grad():
        y = ddp.module(x)
    return {
        "output": y,
        "tau": [t.clone() for t in trim.thresholds],
        "weights": [w.detach().clone() for w in trim.weights()],
        "initialized": torch.tensor([s.observer.initialized for _, s, _ in qtrim_fx.iter_sites(qm)]),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*quantization site.*no statistics yet.*")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        path = Path(out)
        results = {
            "train": _scenario_train(rank, path),
            "calibrate": _scenario_calibrate(rank),
            "nonfinite": _scenario_nonfinite(rank),
            "rank0_load": _scenario_rank0_load(rank, path),
        }
        torch.save(results, path / f"results_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers still running after {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out / f"results_rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def _assert_same(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs across ranks: {a} vs {b}"
    else:
        assert a == b, f"{what} differs across ranks: {a!r} vs {b!r}"


@pytest.mark.timeout(150)
def test_ddp_training_keeps_every_rank_identical(ranks):
    (r0, r1), out = ranks
    a, b = r0["train"], r1["train"]
    _assert_same(a["sites"], b["sites"], "site statistics")
    _assert_same(a["lam"], b["lam"], "λ")
    _assert_same(a["tau"], b["tau"], "pruning thresholds τ")
    _assert_same(a["pinned"], b["pinned"], "pinned epochs")
    _assert_same(a["state"], b["state"], "state_dict (weights, BatchNorm, statistics)")
    assert a["pinned"].tolist() == [1, 2, 3] and float(a["lam"][0]) > 0.5
    steps, every = EPOCHS * STEPS_PER_EPOCH, qtrim_fx.QuantConfig().update_every
    assert all(int(s[-1]) == -(-steps // every) for s in a["sites"].values())  # calls 1, N+1, 2N+1, ...
    # The statistics are those of both ranks' data (rank 1's inputs are 3x larger).
    hi = float(a["sites"]["input.x"][1])
    assert float(a["local_input_hi"]) < hi < float(b["local_input_hi"])
    onnx0, onnx1 = ((out / f"train_rank{r}.onnx").read_bytes() for r in range(WORLD))
    assert len(onnx0) > 0 and onnx0 == onnx1


@pytest.mark.timeout(150)
def test_ddp_calibrate_with_uneven_and_empty_batches(ranks):
    (r0, r1), _ = ranks
    a, b = r0["calibrate"], r1["calibrate"]
    assert int(a["used"]) == int(b["used"]) == 3  # rank 0 runs out after 3; its empty one still joins
    _assert_same(a["sites"], b["sites"], "calibrated statistics")
    assert all(torch.isfinite(s).all() for s in a["sites"].values())
    # Unclipped (output) sites: the min / max over every rank's batches, not a mean of the ranks'.
    lo, hi = min(a["extremes"][0], b["extremes"][0]), max(a["extremes"][1], b["extremes"][1])
    assert a["outputs"] and all(float(v[0]) == float(lo) and float(v[1]) == float(hi) for v in a["outputs"].values())
    # Bias correction: measured over every rank's batches (sums all-reduced), the same on both ranks.
    assert a["bias_shifts"] and all(v.any() for v in a["bias_shifts"].values())
    _assert_same(a["bias_shifts"], b["bias_shifts"], "bias corrections")


@pytest.mark.timeout(150)
def test_ddp_nonfinite_values_warn_on_their_rank_and_stats_stay_finite(ranks):
    (r0, r1), _ = ranks
    a, b = r0["nonfinite"], r1["nonfinite"]
    _assert_same(a["sites"], b["sites"], "statistics after NaN on rank 1")
    assert all(torch.isfinite(s).all() for s in a["sites"].values())
    assert not a["warned"]
    assert len(b["warned"]) == 1 and "input.x" in b["warned"][0] and "in epoch 0" in b["warned"][0]


@pytest.mark.timeout(150)
def test_ddp_checkpoint_loaded_on_rank0_only_is_realigned_by_epoch_start(ranks):
    (r0, r1), _ = ranks
    a, b = r0["rank0_load"], r1["rank0_load"]
    assert bool(b["initialized"].all())
    _assert_same(a["tau"], b["tau"], "pruning thresholds τ")
    _assert_same(a["weights"], b["weights"], "pinned weights")
    _assert_same(a["output"], b["output"], "quantized output")


def test_ddp_ignores_per_rank_diagnostics_only():
    qm = qtrim_fx.prepare(get_model("tiny_mlp")[0])
    ignored = qm._ddp_params_and_buffers_to_ignore
    assert ignored and all(n.endswith(".observer.nonfinite") for n in ignored)
    assert len(ignored) == len(list(qtrim_fx.iter_sites(qm)))
