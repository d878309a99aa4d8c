"""Regression (issue 17, item 6): timm fastvit_t8 failed in prepare/calibrate with numpy's
"At least one stride in the given numpy array is negative": the host top-k selection of one value
per row (k = 1) returned a reversed view that ``np.ascontiguousarray`` keeps (a length-1 axis counts
as contiguous) and ``torch.from_numpy`` refuses."""

from __future__ import annotations

import pytest
import torch

from qtrim_fx.runtime import quantiles


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_host_topk_matches_torch_topk(k, largest):
    torch.manual_seed(0)
    v = torch.randn(600, 40)
    assert quantiles.host_selects(v, k)  # the numpy path is the one under test
    got = quantiles._topk_values(v, k, largest)
    assert torch.equal(got, torch.topk(v, k, dim=-1, largest=largest, sorted=True).values)
    assert all(s > 0 for s in got.stride())
