"""What an :class:`~qtrim_fx.runtime.observer.EmaQuantileObserver` needs beyond its arithmetic.

* the ``torch.compile`` glue: one opaque custom op per update (``qtrim_fx::observe``, declared as
  mutating the four state buffers) that finds its observer by id, so host-side counters, the seeded
  generator and the optional all-reduce run eagerly inside a compiled graph;
* the ``torch.distributed`` reductions that keep the statistics identical on every rank;
* the ``state_dict`` hooks: the host-side call counter (the ``update_every`` phase) saved and restored,
  lazily sized per-channel buffers resized, files of the quantile rule loaded into the MSE rule.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist

from qtrim_fx.runtime.range_rule import TAIL_FRACTIONS

# The observer is typed by name only: importing its module here would be a cycle.
EmaQuantileObserver = Any

__all__ = ["CALLS_KEY", "LIVE", "all_reduce_extremes", "all_reduce_mean", "is_distributed", "load_state_pre_hook",
           "save_calls", "train_call_outside_graph"]

#: Observers reachable from compiled graphs, by id (the graph holds the id as a constant).
LIVE: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


@torch.library.custom_op("qtrim_fx::observe", mutates_args=("lo", "hi", "num_updates", "nonfinite"))
def _observe_op(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_updates: torch.Tensor, nonfinite: torch.Tensor,
    observer_id: int,
) -> None:
    """One training call of an :class:`EmaQuantileObserver` inside a compiled graph."""
    observer = LIVE.get(observer_id)
    if observer is None:
        raise RuntimeError("qtrim_fx: a compiled graph called an observer that no longer exists")
    observer._train_call(x, lo, hi, num_updates, nonfinite)


@_observe_op.register_fake
def _(x, lo, hi, num_updates, nonfinite, observer_id) -> None:
    return None


@torch.compiler.disable
def train_call_outside_graph(observer: EmaQuantileObserver, x: torch.Tensor) -> None:
    observer._train_call(x, observer.lo, observer.hi, observer.num_updates, observer.nonfinite)


def is_distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one rank (so statistics are all-reduced)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(
    lo: torch.Tensor, hi: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of each rank's step statistics over the ranks where they are valid (one all-reduce)."""
    wide = valid.unsqueeze(-1).expand_as(lo) if lo.dim() > valid.dim() else valid  # tail nodes: (C, K)
    buf = torch.stack([torch.where(wide, lo, 0.0), torch.where(wide, hi, 0.0), wide.to(lo.dtype)])
    dist.all_reduce(buf)
    count = buf[2]
    denom = count.clamp(min=1.0)
    ok = count > 0
    return buf[0] / denom, buf[1] / denom, ok[..., 0] if ok.dim() > valid.dim() else ok


def all_reduce_extremes(
    lo: torch.Tensor, hi: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo``/``hi`` tail nodes whose last node (the min / max) is the extreme over all ranks.

    One all-reduce (MAX); ranks without a valid value contribute nothing. The other nodes are
    returned as they are (:func:`all_reduce_mean` averages them afterwards).
    """
    ext = torch.where(valid, torch.stack([hi[..., -1], -lo[..., -1]]), -torch.inf)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX)
    return torch.cat([lo[..., :-1], -ext[1].unsqueeze(-1)], -1), torch.cat([hi[..., :-1], ext[0].unsqueeze(-1)], -1)


CALLS_KEY = "calls"


def save_calls(module: EmaQuantileObserver, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: the host call counter (the ``update_every`` phase) as a 0-D int64.

    It is kept on the host during training (no device write per step) and written only here,
    so a resumed run observes on exactly the calls an uninterrupted one would.
    """
    state_dict[prefix + CALLS_KEY] = torch.tensor(module._calls, dtype=torch.int64)


def load_state_pre_hook(obs: EmaQuantileObserver, state_dict: dict, prefix: str) -> None:
    """``load_state_dict`` pre-hook of an observer: buffers sized to the file, host counters restored."""
    if obs._mse:
        for name, src in (("tail_lo", "lo"), ("tail_hi", "hi")):
            if prefix + name not in state_dict and prefix + src in state_dict:
                # A file from the quantile rule: its range as flat tails (the same range selected).
                state_dict[prefix + name] = state_dict[prefix + src].unsqueeze(-1).repeat_interleave(
                    len(TAIL_FRACTIONS), -1)
    for name in ("lo", "hi", "tail_lo", "tail_hi"):
        if name in ("tail_lo", "tail_hi") and not obs._mse:
            continue
        t = state_dict.get(prefix + name)
        if t is not None and t.shape != getattr(obs, name).shape:
            # Per-channel buffers are sized lazily on the first observation.
            setattr(obs, name, torch.full_like(t, math.nan, device=getattr(obs, name).device))
    calls = state_dict.pop(prefix + CALLS_KEY, None)  # not a buffer: popped so strict loading accepts it
    n = state_dict.get(prefix + "num_updates")
    if n is not None:
        obs._updates = int(n)
        obs._initialized = obs._updates > 0
        # Files without the call count (older ones) put the next update N calls on.
        obs._calls = int(calls) if calls is not None else obs._updates * obs.update_every
