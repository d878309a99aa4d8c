"""PooledTails and calibrate's pooled statistics: the calibration set's tail quantiles, whatever its batching."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.runtime.pooled_tails import PooledTails
from qtrim_fx.runtime.range_rule import tail_levels

P_LO, P_HI = 0.001, 0.999
LEVELS = (tail_levels(P_LO, False), tail_levels(P_HI, True))


def _reference(rows: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """torch.quantile of each row's finite values at ``levels``."""
    out = []
    for r in rows:
        finite = r[torch.isfinite(r)].double()
        out.append(torch.quantile(finite, torch.tensor(levels, dtype=torch.float64)))
    return torch.stack(out).float()


@pytest.mark.parametrize("sizes", [(5000,), (3000, 7, 1, 250), (64,) * 40])
@pytest.mark.parametrize("spread", ["growing", "shrinking"])
def test_pooled_nodes_are_the_quantiles_of_the_concatenated_batches(sizes, spread):
    """Exact when the batch count is known and no batch is wider than the first; a shrinking spread is the hard
    order (the first batch holds the whole set's deep tail: its values must survive the early merges)."""
    g = torch.Generator().manual_seed(len(sizes))
    scale = [(1 + i) if spread == "growing" else (len(sizes) - i) for i in range(len(sizes))]
    batches = [torch.randn(3, n, generator=g) * s for n, s in zip(sizes, scale, strict=True)]
    pool = PooledTails(P_LO, P_HI, expected_batches=len(batches))
    for b in batches:
        assert pool.add(b) == 0
    lo, hi, valid = pool.nodes(*LEVELS)
    whole = torch.cat(batches, -1)
    torch.testing.assert_close(hi, _reference(whole, LEVELS[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, _reference(whole, LEVELS[0]), rtol=1e-5, atol=1e-6)
    assert valid.all()
    assert torch.equal(hi[:, -1], whole.amax(-1)) and torch.equal(lo[:, -1], whole.amin(-1))


def test_without_the_batch_count_iid_batches_pool_to_the_set_quantiles():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 4096, generator=g) for _ in range(32)]
    pool = PooledTails(P_LO, P_HI)
    for b in batches:
        pool.add(b)
    lo, hi, _ = pool.nodes(*LEVELS)
    whole = torch.cat(batches, -1)
    torch.testing.assert_close(hi, _reference(whole, LEVELS[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, _reference(whole, LEVELS[0]), rtol=1e-5, atol=1e-6)


def test_non_finite_values_are_left_out_and_counted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, generator=g), torch.randn(2, 1000, generator=g)
    a[0, :10] = math.nan
    b[1, :5] = math.inf
    b[0, 5:8] = -math.inf
    pool = PooledTails(P_LO, P_HI)
    assert pool.add(a) + pool.add(b) == 18
    lo, hi, _ = pool.nodes(*LEVELS)
    whole = torch.cat([a, b], -1)
    torch.testing.assert_close(hi, _reference(whole, LEVELS[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, _reference(whole, LEVELS[0]), rtol=1e-5, atol=1e-6)
    assert pool.count.tolist() == [1987, 1995]


def test_a_row_with_no_finite_value_is_invalid_and_a_row_count_change_is_refused():
    pool = PooledTails(P_LO, P_HI)
    pool.add(torch.tensor([[math.nan, math.inf], [1.0, 2.0]]))
    _, _, valid = pool.nodes(*LEVELS)
    assert valid.tolist() == [False, True]
    with pytest.raises(ValueError, match="2 rows"):
        pool.add(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no batch"):
        PooledTails(P_LO, P_HI).nodes(*LEVELS)


def _nodes(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    qm = qtrim_fx.prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.calibrate(qm, [(b,) for b in batches], bias_correction=False)
    # the tail nodes a clipped site chooses its range from (an unclipped site's range: its extremes), flattened
    return {s.name: torch.cat([site.observer.tail_lo.flatten(), site.observer.tail_hi.flatten()])
            if site.observer.clip else torch.stack([site.observer.lo, site.observer.hi]).flatten()
            for s, site, _ in qtrim_fx.iter_sites(qm) if s.kind == "activation"}


@pytest.mark.parametrize("name", ["vit_tiny", "tiny_convnet"])
def test_calibrated_ranges_do_not_depend_on_the_batch_size(name):
    """The same 8 inputs, calibrated one at a time or as one batch: the same tail statistics (the per-batch means
    this replaced gave one image's tails, far inside the set's: a ViT lost 6 dB calibrated one image at a time)."""
    model, _ = get_model(name, batch_size=1)
    xs = torch.cat([get_model(name, batch_size=1, seed=s)[1][0] for s in range(8)])  # < max_samples elements
    one_by_one = _nodes(model, list(xs.split(1)))
    together = _nodes(model, [xs])
    assert one_by_one.keys() == together.keys() and len(together) > 5
    for key, nodes in together.items():  # a batched matmul sums in another order: float32 rounding apart
        torch.testing.assert_close(one_by_one[key], nodes, rtol=1e-4, atol=1e-5, msg=key)
