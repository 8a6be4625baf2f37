"""The public surface: what ``import beyond_top1 as bt`` offers, and the names that moved."""

from __future__ import annotations

import importlib
import warnings

import pytest

import beyond_top1 as bt


def test_every_public_name_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in bt.__all__:
            assert getattr(bt, name) is not None, name
    assert set(dir(bt)) >= set(bt.__all__)


@pytest.mark.parametrize("name", sorted(set(bt._MOVED) - bt._WARN_WHEN_CALLED))
def test_a_moved_name_warns_and_is_the_object_in_its_new_home(name):
    module, attribute, _ = bt._MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"bt.{name} moved"):
        old = getattr(bt, name)
    assert old is getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", sorted(bt._WARN_WHEN_CALLED))
def test_a_moved_function_that_warns_when_called_is_looked_up_quietly(name):
    module, attribute, _ = bt._MOVED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(bt, name) is getattr(importlib.import_module(module), attribute)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        bt.no_such_thing  # noqa: B018


def test_the_namespaces_hold_what_the_readme_uses():
    assert bt.stats.saturation_layers and bt.stats.kendall_tau_strict and bt.stats.task_labels
    assert bt.views.colored_tokens and bt.views.compare_lenses and bt.views.page
    assert bt.errors.LensFileError and bt.errors.UnknownModelError
    assert bt.plot.plot_ordering_comparison and bt.hooks.copy_position
    for task in ("scan", "ordering", "probe", "interventions", "early_exit", "lens_fit"):
        module = getattr(bt.tasks, task)
        assert callable(module.run) and callable(module.load), task


def test_the_deprecated_fit_submodule_maps_warns_and_gives_the_same_maps(tiny_model):
    from beyond_top1.replacement import SubmoduleMaps, fit_submodule_maps

    texts = ["The cat sat on the mat.", "Paris is the capital of France."] * 3
    kwargs = dict(layers=[1], kinds=("attn",), max_len=16, progress=False)
    with pytest.warns(DeprecationWarning, match="SubmoduleMaps.fit"):
        old = fit_submodule_maps(tiny_model, texts, **kwargs)
    new = SubmoduleMaps.fit(tiny_model, texts, **kwargs)
    assert old.layers == new.layers
    assert all(old.weight[k].equal(new.weight[k]) for k in new.weight)


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("beyond_top1.readout", "beyond_top1.prompt", "top_tokens"),
        ("beyond_top1.reproduce_report", "beyond_top1.reproduce.report", "rebuild_report"),
        ("beyond_top1.generation", "beyond_top1.early_exit", "MarginExit"),
    ],
)
def test_a_moved_module_warns_and_re_exports(old, new, name):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_ordering_arguments_of_a_scan_warn_and_change_nothing(tiny_model, tmp_path):
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    plain = bt.scan(tiny_model, texts, k=3, progress=False)
    with pytest.warns(DeprecationWarning, match="scan.ordering"):
        old = bt.scan(tiny_model, texts, k=3, progress=False, n_permutations=10)
    assert old.saturation.equals(plain.saturation)
    from beyond_top1.scans import save_scan

    with pytest.warns(DeprecationWarning, match="scan.ordering"):
        save_scan(plain, tmp_path / "s", n_permutations=10, seed=1)
    assert bt.load_scan(tmp_path / "s").saturation.equals(plain.saturation)
    with pytest.raises(TypeError, match="nonsense"):
        bt.scan(tiny_model, texts, k=3, progress=False, nonsense=1)


def test_the_old_probe_adapters_warn_and_agree_with_apply_probe():
    import numpy as np
    import torch

    from beyond_top1 import early_exit
    from beyond_top1.probes import apply_probe

    class Stub:
        def predict(self, X):
            return np.where(X[:, 0] > 0, 2, 1)

    resid = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match="apply_probe"):
        old = early_exit.probe_predict
    assert old(Stub(), resid).tolist() == apply_probe(Stub(), resid[:, None])[0][:, 0].tolist()
