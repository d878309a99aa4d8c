"""site_key: ModuleDict-safe keys, also for names that are nn.Module attributes."""

from __future__ import annotations

import torch

from qtrim_fx.core.spec import site_key


def test_dotted_names_become_underscored():
    assert site_key("layer1.0.conv1.weight") == "layer1_0_conv1_weight"


def test_names_of_module_attributes_get_a_prefix_and_fit_a_module_dict():
    names = ["to", "training", "forward", "cuda", "type", "eval", "add.out", "x"]
    keys = [site_key(n) for n in names]
    assert keys[:6] == ["site_to", "site_training", "site_forward", "site_cuda", "site_type", "site_eval"]
    assert keys[6:] == ["add_out", "x"]
    d = torch.nn.ModuleDict()
    for k in keys:
        d[k] = torch.nn.Identity()  # add_module refuses an existing attribute name
    assert list(d) == keys
