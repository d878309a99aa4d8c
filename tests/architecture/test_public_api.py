"""The public API survives the restructure: top-level names, public namespaces, deprecated aliases, errors."""

from __future__ import annotations

import importlib
import sys

import pytest

import qtrim_fx
from qtrim_fx.core import errors


def test_every_public_name_resolves():
    for name in qtrim_fx.__all__:
        assert getattr(qtrim_fx, name) is not None, name
    # the functions no longer shadow modules of the same name
    for fn in ("prepare", "lower", "capture", "calibrate", "inspect", "verify", "export_onnx", "check"):
        assert callable(getattr(qtrim_fx, fn)), fn


def test_checkpoint_namespace_is_public():
    import qtrim_fx.checkpoint as ck

    assert qtrim_fx.checkpoint is ck and callable(ck.save) and callable(ck.load)


@pytest.mark.parametrize(("old", "new", "name"), [
    ("qtrim_fx.cli", "qtrim_fx.tools.cli", "main"),
    ("qtrim_fx.plots", "qtrim_fx.tools.plots", "plot_curriculum"),
    ("qtrim_fx.graph_view", "qtrim_fx.tools.graph_view", "graph_to_networkx"),
    ("qtrim_fx.integrations.lightning", "qtrim_fx.train.lightning", "QuantTrimCallback"),
])
def test_moved_modules_keep_an_alias_that_warns(old, new, name):
    pytest.importorskip("matplotlib") if "plots" in old else None
    if "lightning" in old:
        pytest.importorskip("lightning")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_error_hierarchy_has_one_root_and_keeps_builtin_bases():
    value_errors = (errors.ConfigError, errors.NoSitesError, errors.CaptureError, errors.CheckpointError,
                    errors.ProfileError, errors.ExportError, errors.UncalibratedSitesError)
    for cls in (*value_errors, errors.VerifyError):
        assert issubclass(cls, qtrim_fx.QtrimError), cls
    for cls in value_errors:
        assert issubclass(cls, ValueError), cls
    assert issubclass(errors.CheckpointError, RuntimeError)  # like nn.Module.load_state_dict's errors
    assert issubclass(errors.VerifyError, RuntimeError)
    assert qtrim_fx.SchemeError is qtrim_fx.ConfigError  # the former name stays an alias
    with pytest.raises(qtrim_fx.QtrimError):
        qtrim_fx.get_profile("no-such-target")
