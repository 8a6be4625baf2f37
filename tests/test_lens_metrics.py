"""Streaming lens metrics and quality-of-fit matrices against slow, direct references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

import beyond_top1 as bt
from beyond_top1.figures import (
    plot_lens_metric,
    plot_lens_metrics,
    plot_quality_of_fit,
    save_figure,
)
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.metrics import LENS_METRICS, evaluate_lenses, quality_of_fit_matrix
from beyond_top1.prompt import prompt_residuals

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "A lens reads a residual stream as a distribution over the next token, layer by layer.",
    "One two three four five six seven.",
    "Rivers flow downhill.",
]
MORE_TEXTS = [
    "Mountains rise above the clouds, and snow covers their peaks for most of the year.",
    "The library opens at nine in the morning and closes late on Thursdays.",
    "She wrote three novels before she turned thirty, each longer than the last.",
    "Copper conducts electricity well, which is why it is used in wires.",
]


class AffineLens(Lens):
    """A fixed, layer-dependent affine map ``h W_l + b_l`` for layers ``0..L-2`` only."""

    kind = "affine"

    def __init__(self, model, seed: int = 0):
        super().__init__(model)
        g = torch.Generator().manual_seed(seed)
        n, d = self.n_layers - 1, self.d_model
        self.register_buffer("weight", torch.eye(d) + 0.2 * torch.randn(n, d, d, generator=g))
        self.register_buffer("bias", torch.randn(n, d, generator=g))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers - 1))

    def transform(self, resid, layer):
        return resid @ self.weight[layer] + self.bias[layer]


def _reference_row(model, lens, layer: int, texts) -> dict:
    """Every metric from the full residuals of each text at once, with full sorts."""
    last = model.cfg.n_layers - 1
    h, y, nxt = [], [], []
    for text in texts:
        ids, resid = prompt_residuals(model, text, layers=[layer, last])
        h.append(resid[1:, 0])  # position 0 (the attention sink) is not scored
        y.append(resid[1:, 1])
        nxt.extend(ids[2:] + [-1])
    h, y, nxt = torch.cat(h), torch.cat(y), torch.tensor(nxt)
    with torch.inference_mode():
        log_p = bt.LogitLens(model)(y, last).log_softmax(-1)
        log_q = lens(h, layer).log_softmax(-1)
        mapped = lens.transform(h, layer)
    top1 = log_q.argmax(-1)
    order = torch.argsort(log_p, dim=-1, descending=True)
    has_next = nxt >= 0
    row = {
        "n_tokens": len(h),
        "r2": r2_score(y.double().numpy(), mapped.double().numpy(), multioutput="uniform_average"),
        "surprisal": -log_p.gather(-1, top1[:, None]).mean().item(),
        "kl": F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item(),
        "cross_entropy": F.cross_entropy(log_q[has_next], nxt[has_next]).item(),
        "n_next_tokens": int(has_next.sum()),
    }
    for k in (1, 5, 10):
        row[f"precision_at_{k}"] = (order[:, :k] == top1[:, None]).any(-1).float().mean().item()
    return row


def test_streaming_metrics_match_direct_reference(tiny_model):
    lenses = {"logit": bt.LogitLens(tiny_model), "affine": AffineLens(tiny_model)}
    frame = evaluate_lenses(tiny_model, lenses, TEXTS, batch_size=2, progress=False)
    assert list(frame.columns) == [
        "lens",
        "layer",
        "n_tokens",
        *LENS_METRICS,
        "n_next_tokens",
    ]
    assert frame[["lens", "layer"]].values.tolist() == [
        ["logit", 0],
        ["logit", 1],
        ["logit", 2],
        ["affine", 0],
        ["affine", 1],
    ]
    for row in frame.itertuples():
        expected = _reference_row(tiny_model, lenses[row.lens], row.layer, TEXTS)
        got = {key: getattr(row, key) for key in expected}
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (row.lens, row.layer)
    # The metrics are not degenerate on this model: a check that can fail.
    assert frame.kl.iloc[0] > 0.01 and frame.r2.iloc[0] < 0.99


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ln_model"])
def test_logit_lens_is_exact_at_the_last_layer(fixture, request):
    model = request.getfixturevalue(fixture)
    last = model.cfg.n_layers - 1
    frame = evaluate_lenses(model, [bt.LogitLens(model)], TEXTS, layers=[last], progress=False)
    row = frame.iloc[0]
    assert (row.lens, row.layer) == ("logit", last)
    assert row.kl < 1e-6
    assert row.precision_at_1 == row.precision_at_5 == row.precision_at_10 == 1.0
    assert row.r2 == 1.0


def test_results_do_not_depend_on_the_batch_size(tiny_ln_model):
    lenses = [bt.LogitLens(tiny_ln_model), AffineLens(tiny_ln_model, seed=3)]
    one = evaluate_lenses(tiny_ln_model, lenses, TEXTS, batch_size=1, progress=False)
    four = evaluate_lenses(tiny_ln_model, lenses, TEXTS, batch_size=4, progress=False)
    pd.testing.assert_frame_equal(one, four, rtol=1e-5, atol=1e-7)


def test_evaluate_lenses_rejects_bad_requests(tiny_model):
    logit = bt.LogitLens(tiny_model)
    with pytest.raises(ValueError, match="two lenses of kind"):
        evaluate_lenses(tiny_model, [logit, bt.LogitLens(tiny_model)], TEXTS, progress=False)
    with pytest.raises(ValueError, match=r"no lens reads layer\(s\) \[2\]"):
        evaluate_lenses(tiny_model, [AffineLens(tiny_model)], TEXTS, layers=[0, 2])


def _stacked(model, texts, layers) -> np.ndarray:
    """``[tokens, layer, d_model]`` residuals of all texts (float64)."""
    return np.concatenate(
        [prompt_residuals(model, t, layers)[1][1:].double().numpy() for t in texts]  # no pos. 0
    )


def _design(x: np.ndarray, bias: bool) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x


@pytest.mark.parametrize("bias", [False, True])
def test_quality_of_fit_matches_least_squares_and_sklearn(tiny_model, bias):
    layers = [0, 1, 2]
    frame = quality_of_fit_matrix(
        tiny_model,
        MORE_TEXTS,
        TEXTS,
        layers=layers,
        bias=bias,
        ridge=0.0,
        batch_size=3,
        progress=False,
    )
    assert frame[["source", "target"]].values.tolist() == [[0, 1], [0, 2], [1, 2]]
    train, val = _stacked(tiny_model, MORE_TEXTS, layers), _stacked(tiny_model, TEXTS, layers)
    for row in frame.itertuples():
        x, y = _design(train[:, row.source], bias), train[:, row.target]
        weight = np.linalg.lstsq(x, y, rcond=None)[0]
        xv, yv = val[:, row.source], val[:, row.target]
        # abs: the batched and the one-text forward passes differ at float32 round-off
        assert row.r2_identity == pytest.approx(r2_score(yv, xv), rel=1e-6, abs=1e-6)
        expected = r2_score(yv, _design(xv, bias) @ weight)
        assert row.r2_linear == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_linear_maps_beat_the_identity_on_their_training_data(tiny_model):
    frame = quality_of_fit_matrix(tiny_model, MORE_TEXTS, MORE_TEXTS, ridge=0.0, progress=False)
    assert len(frame) == 3
    assert (frame.r2_linear >= frame.r2_identity - 1e-9).all()
    assert (frame.r2_linear > frame.r2_identity + 0.01).any()


def _metric_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [
        {"lens": lens, "layer": layer, **{m: rng.random() for m in LENS_METRICS}}
        for lens in ("logit", "linear")
        for layer in range(4)
    ]
    return pd.DataFrame(rows)


def test_figures_write_png_and_svg(tmp_path):
    frame = _metric_frame()
    figures = plot_lens_metrics(frame)
    assert set(figures) == set(LENS_METRICS)
    assert [line.get_label() for line in figures["kl"].axes[0].get_lines()] == ["logit", "linear"]
    pairs = [(s, t) for s in range(4) for t in range(s + 1, 4)]
    matrix = pd.DataFrame(
        [{"source": s, "target": t, "r2_linear": 0.9, "r2_identity": -0.5} for s, t in pairs]
    )
    fig = plot_quality_of_fit(matrix)
    assert len(fig.axes) == 3  # two heatmaps and a colour bar
    for name, figure in [("kl", figures["kl"]), ("fit/matrix", fig)]:
        png, svg = save_figure(figure, tmp_path / name)
        assert png.read_bytes().startswith(b"\x89PNG")
        assert "<svg" in svg.read_text()


def test_plot_lens_metric_draws_on_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    assert plot_lens_metric(_metric_frame(), "r2", ax=ax) is fig
    with pytest.raises(KeyError, match="no column"):
        plot_lens_metric(_metric_frame(), "accuracy")


def test_quality_of_fit_agrees_with_the_linear_shortcut_lens(tiny_model):
    """Pairs ``(l, L-1)`` of the matrix are the r² that evaluate_lenses reports for the lenses."""
    last = tiny_model.cfg.n_layers - 1
    matrix = quality_of_fit_matrix(tiny_model, MORE_TEXTS, TEXTS, progress=False)
    lenses = [
        bt.LogitLens(tiny_model),
        bt.LinearShortcutLens.fit(tiny_model, MORE_TEXTS, progress=False),
    ]
    frame = evaluate_lenses(tiny_model, lenses, TEXTS, layers=range(last), progress=False)
    to_last = matrix[matrix.target == last].set_index("source")
    by_lens = frame.pivot(index="layer", columns="lens", values="r2")
    np.testing.assert_allclose(by_lens["linear"], to_last["r2_linear"], rtol=1e-5)
    np.testing.assert_allclose(by_lens["logit"], to_last["r2_identity"], rtol=1e-6)
