"""``beyond-top1 reproduce``: the stage cache (skip, rerun, resume), the offline report and
metrics.json, on tiny models."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1 import reproduce as rp
from beyond_top1.reproduce.graph import Graph, ModelRef
from beyond_top1.stages import DONE_FILE, STARTED_FILE, Stages, StageUnavailable

# ---------------------------------------------------------------------------------------------
# The stage cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cfg:
    """A stage's typed config."""

    n: int = 0


class Counter:
    """A stage function that counts its calls and writes one file."""

    def __init__(self, fail_after_write: bool = False):
        self.calls = 0
        self.fail_after_write = fail_after_write
        self.seen_partial = []

    def __call__(self, folder):
        self.calls += 1
        self.seen_partial.append((folder / "partial.txt").exists())
        (folder / "partial.txt").write_text("half")
        if self.fail_after_write:
            raise KeyboardInterrupt  # an interruption, not an error of the analysis
        (folder / "result.txt").write_text("done")
        return {"value": 1.5, "calls": self.calls}


def test_a_finished_stage_is_skipped_with_the_same_settings(tmp_path):
    fn = Counter()
    first = Stages(tmp_path, log=None).run("a", Cfg(3), fn)
    second = Stages(tmp_path, log=None).run("a", Cfg(3), fn)
    assert fn.calls == 1
    assert not first.cached and second.cached
    assert second.metrics == {"value": 1.5, "calls": 1} == first.metrics
    done = json.loads((tmp_path / "a" / DONE_FILE).read_text())
    assert done["settings"] == {"task": "Cfg", "config": {"n": 3}} and done["status"] == "done"
    assert not (tmp_path / "a" / STARTED_FILE).exists()


def test_a_changed_setting_reruns_the_stage_on_a_clean_folder(tmp_path):
    fn = Counter()
    Stages(tmp_path, log=None).run("a", Cfg(3), fn)
    (tmp_path / "a" / "stale.txt").write_text("from the old settings")
    lines = []
    record = Stages(tmp_path, log=lines.append).run("a", Cfg(4), fn)
    assert fn.calls == 2 and not record.cached
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert any("settings changed: config.n" in line for line in lines), lines
    # and back: the new settings are the ones on record now
    assert Stages(tmp_path, log=None).run("a", Cfg(4), fn).cached


def test_force_reruns_a_finished_stage(tmp_path):
    fn = Counter()
    Stages(tmp_path, log=None).run("a", Cfg(), fn)
    Stages(tmp_path, force=["a"], log=None).run("a", Cfg(), fn)
    assert fn.calls == 2


def test_an_interrupted_stage_resumes_on_its_folder(tmp_path):
    interrupted = Counter(fail_after_write=True)
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, log=None).run("a", Cfg(3), interrupted)
    assert not (tmp_path / "a" / DONE_FILE).exists()  # never looks finished
    assert (tmp_path / "a" / STARTED_FILE).exists()
    lines = []
    fn = Counter()
    record = Stages(tmp_path, log=lines.append).run("a", Cfg(3), fn)
    assert fn.seen_partial == [True]  # the partial work was kept for it
    assert record.ok and any("resuming" in line for line in lines)
    # an interrupted run with other settings is thrown away instead
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, log=None).run("b", Cfg(1), Counter(fail_after_write=True))
    other = Counter()
    Stages(tmp_path, log=None).run("b", Cfg(2), other)
    assert other.seen_partial == [False]


def test_upstream_changes_rerun_downstream_stages(tmp_path):
    up, down = Counter(), Counter()

    def run(n):
        stages = Stages(tmp_path, log=None)
        first = stages.run("up", Cfg(n), up)
        return stages.run("down", Cfg(1), down, after=[first])

    run(1)
    assert run(1).cached and (up.calls, down.calls) == (1, 1)
    assert not run(2).cached and (up.calls, down.calls) == (2, 2)


def test_an_unavailable_stage_is_recorded_with_its_reason_and_cached(tmp_path):
    calls = []

    def fn(folder):
        calls.append(folder)
        raise StageUnavailable("too few positions")

    record = Stages(tmp_path, log=None).run("p", Cfg(), fn)
    assert record.status == "unavailable" and record.metrics == {"reason": "too few positions"}
    again = Stages(tmp_path, log=None).run("p", Cfg(), fn)
    assert again.cached and again.status == "unavailable" and len(calls) == 1


def test_metrics_are_made_json_safe(tmp_path):
    import numpy as np

    record = Stages(tmp_path, log=None).run(
        "m", Cfg(), lambda folder: {"x": np.float32(0.5), "nan": float("nan"), "n": np.int64(3)}
    )
    assert record.metrics == {"x": 0.5, "nan": None, "n": 3}


def test_a_stage_config_is_a_dataclass(tmp_path):
    with pytest.raises(TypeError, match="dataclass instance"):
        Stages(tmp_path, log=None).run("a", {"n": 3}, Counter())
    with pytest.raises(TypeError, match="dataclass instance"):
        Stages(tmp_path, log=None).run("a", Cfg, Counter())


def test_scale_overrides_are_typed_and_checked():
    assert rp.parse_override("scan_texts=32") == ("scan_texts", 32)
    assert rp.parse_override("tuned_lens=true") == ("tuned_lens", True)
    assert rp.parse_override("intervention_a=none") == ("intervention_a", None)
    with pytest.raises(ValueError, match="unknown scale setting"):
        rp.parse_override("scan_txts=3")
    scale = rp.resolve_scale("quick", {"scan_texts": 5})
    assert scale.scan_texts == 5 and rp.SCALES["quick"].scan_texts != 5
    assert rp.default_twins("smollm2-135m") == ["untrained:smollm2-135m", "untrained:gpt2-small"]
    assert rp.default_twins("gpt2") == ["untrained:gpt2-small"]


# ---------------------------------------------------------------------------------------------
# The pipeline on tiny models
# ---------------------------------------------------------------------------------------------

EXPECTED_STAGES = {
    "lens-linear",
    "lens-metrics",
    "scan-tiny-rms-6l",
    "scan-tiny-ln",
    "ordering",
    "probe-tiny-rms-6l",
    "interventions",
    "early-exit",
    "generation",
    "views",
}


def test_metrics_json_has_every_stage_and_its_headline_numbers(tiny_reproduction):
    result, _, _ = tiny_reproduction
    metrics = json.loads(result.metrics.read_text())
    assert {"model", "scale", "settings", "environment", "stages"} <= set(metrics)
    assert set(metrics["stages"]) == EXPECTED_STAGES
    decodes = hooked.supports_tl_kv_cache(tiny_reproduction[1])
    for name, stage in metrics["stages"].items():
        assert {"status", "cached", "seconds", "settings", "metrics"} <= set(stage), name
        if name == "generation" and not decodes:  # TransformerLens 4: no decoding, said so
            assert stage["status"] == "unavailable"
            assert "key/value cache" in stage["metrics"]["reason"]
            continue
        assert stage["status"] == "done", (name, stage["metrics"])
    m = {name: stage["metrics"] for name, stage in metrics["stages"].items()}
    assert {"logit", "linear"} <= set(m["lens-metrics"])
    assert set(m["ordering"]) == {"tiny-rms-6l", "tiny-ln"}
    assert m["scan-tiny-rms-6l"]["n_layers"] == 6 and m["scan-tiny-ln"]["n_layers"] == 3
    assert "balanced_accuracy_mean" in m["probe-tiny-rms-6l"]
    assert {"method", "lens", "saved_at_95"} <= set(m["early-exit"]["layers_saved"][0])
    if decodes:
        assert m["generation"]["new_tokens"] == rp.SCALES["test"].generation_tokens
    assert "torch" in metrics["environment"]["packages"]
    # the headline helper flattens them
    flat = rp.headline(metrics)
    assert "probe-tiny-rms-6l.balanced_accuracy_mean" in flat


def _brute_tau(s: list[int], n_layers: int) -> float:
    kept = list(s)
    while kept and kept[-1] == n_layers - 1:
        kept.pop()
    if len(kept) < 3:
        return math.nan
    pairs = list(itertools.combinations(range(len(kept)), 2))
    return sum(1 if kept[i] < kept[j] else -1 for i, j in pairs) / len(pairs)


def test_headline_numbers_equal_independent_computations(tiny_reproduction):
    """The report's numbers, recomputed from scratch: float64 lens metrics, τ by loops, token
    counts from the tokenizer, intervention pairs by brute force."""
    result, model, _ = tiny_reproduction
    scale = rp.SCALES["test"]
    m = {n: st["metrics"] for n, st in json.loads(result.metrics.read_text())["stages"].items()}
    L = model.cfg.n_layers
    # logit lens: mean KL(p_final ‖ p_l) and Precision@1 over layers 0..L-1, position 0 left out
    weight, bias = model.W_U.detach().double(), model.b_U.detach().double()
    kl = np.zeros(L)
    hits = np.zeros(L)
    count = 0
    for text in bt.wiki_texts(scale.lens_eval_texts, split="val", seed=0):
        ids = bt.tokenize(model, text, max_len=scale.max_len, truncate=True)
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([ids]))
        logp = []
        for l in range(L):
            h = cache[f"blocks.{l}.hook_resid_post"][0, 1:].double()
            normed = h / (h.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
            logits = (normed * model.ln_final.w.detach().double()) @ weight + bias
            logp.append(logits.log_softmax(-1))
        final = logp[-1]
        for l in range(L):
            kl[l] += float((final.exp() * (final - logp[l])).sum())
            hits[l] += float((logp[l].argmax(-1) == final.argmax(-1)).sum())
        count += len(ids) - 1
    logit = m["lens-metrics"]["logit"]
    assert logit["n_tokens"] == count
    assert logit["mean_kl"] == pytest.approx(kl.mean() / count, rel=1e-4, abs=1e-6)
    assert logit["mean_precision_at_1"] == pytest.approx(hits.mean() / count, abs=1e-9)
    # the scans: one row per token but the first, τ by loops over the saved layers
    texts = bt.wiki_texts(scale.scan_texts, split="val", seed=0)
    lengths = [len(bt.tokenize(model, t, max_len=scale.max_len, truncate=True)) for t in texts]
    assert m["scan-tiny-rms-6l"]["n_positions"] == sum(n - 1 for n in lengths)
    frame = pd.read_parquet(
        result.out / "stages" / "scan-tiny-rms-6l" / "scan" / "saturation.parquet"
    )
    s = frame[[f"s_{i}" for i in range(1, scale.k + 1)]].to_numpy()
    s = s[s[:, 0] <= math.floor(0.85 * L)]
    taus = [t for t in (_brute_tau(list(row), L) for row in s) if not math.isnan(t)]
    ordering = m["ordering"]["tiny-rms-6l"]
    assert ordering["n_kept"] == len(taus)
    assert ordering["mean_tau"] == pytest.approx(sum(taus) / len(taus), abs=1e-12)
    # interventions: forward pairs of the held-out half of the texts, one per target
    delta = max(1, math.floor(10 * L / 24 + 0.5))
    rows = frame.to_dict("records")
    targets = {
        (b["text_id"], b["pos"])
        for a, b in itertools.permutations(rows, 2)
        if a["text_id"] == b["text_id"] >= scale.scan_texts // 2
        and a["top_1_id"] == b["top_1_id"]
        and 0 < b["pos"] - a["pos"] <= 30
        and b["s_1"] - a["s_1"] >= delta
    }
    assert m["interventions"]["n_pairs"] == min(scale.intervention_pairs, len(targets))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster") and value:
                self.links.append((tag, name, value))


def test_the_report_is_self_contained(tiny_reproduction):
    result, _, _ = tiny_reproduction
    page = result.report.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    external = [link for link in parser.links if re.match(r"\s*(https?:)?//", link[2], flags=re.I)]
    assert external == []
    for tag, _name, value in parser.links:  # images inline, anchors on the page
        if tag == "img":
            assert value.startswith("data:image/png;base64,"), value[:40]
        elif tag == "a":
            assert value.startswith("#"), value
    assert parser.tags.get("img", 0) >= 8  # lens, ordering, probe, intervention, exit figures
    assert parser.tags.get("table", 0) >= 10
    # the CircuitsVis bundle is included once; every view is mounted from it
    assert page.count("CircuitsVis.render(") >= 4
    assert len(re.findall(r"<script>\s*\S", page)) >= 5
    bundle_marker = "var CircuitsVis"
    assert page.count(bundle_marker) <= 1
    assert 1_000_000 < len(page) < 8_000_000


def test_a_second_run_skips_every_stage(tiny_reproduction, monkeypatch):
    result, model, twin = tiny_reproduction
    ran = []
    original = Stages.run

    def counting(self, name, settings, fn, **kwargs):
        def wrapped(folder):
            ran.append(name)
            return fn(folder)

        return original(self, name, settings, wrapped, **kwargs)

    monkeypatch.setattr(Stages, "run", counting)
    again = rp.reproduce(
        model, result.out, scale="test", twins={"tiny-ln": twin}, progress=False, log=None
    )
    assert ran == []
    assert all(rec.cached for rec in again.records.values())
    # a changed setting reruns that stage (and what depends on it) only
    changed = rp.reproduce(
        model,
        result.out,
        scale="test",
        overrides={"intervention_pairs": 2},
        twins={"tiny-ln": twin},
        progress=False,
        log=None,
    )
    assert ran == ["interventions"]
    assert not changed.records["interventions"].cached
    assert (
        json.loads((result.out / "metrics.json").read_text())["stages"]["interventions"][
            "settings"
        ]["config"]["max_pairs"]
        == 2
    )


def test_an_interrupted_scan_continues_from_its_last_shard(tmp_path, monkeypatch, tiny_model):
    """The scan stage resumes the scan's own shards: only the missing batches are recomputed."""
    import beyond_top1.scans.run as scans

    scale = rp.resolve_scale("test", {"batch_size": 1, "scan_texts": 5, "max_len": 12})
    calls = []
    original = scans._scan_batch

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first shard (batches 0-3) is on disk by now
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(scans, "_scan_batch", flaky)

    def run_scan():
        main = ModelRef("tiny", tiny_model, device="cpu", seed=0)
        graph = Graph(scale, 0, False, main, [])
        step = next(step for step in graph.steps() if step.name == "scan-tiny")
        return graph.run_step(Stages(tmp_path, log=None), step)

    with pytest.raises(KeyboardInterrupt):
        run_scan()
    assert not (tmp_path / "scan-tiny" / DONE_FILE).exists()
    calls.clear()
    record = run_scan()
    assert record.ok and not record.cached
    assert len(calls) == 1  # batch 4 only
    full = scans.load_scan(tmp_path / "scan-tiny" / "scan")
    monkeypatch.setattr(scans, "_scan_batch", original)
    fresh = scans.scan(
        tiny_model,
        bt.wiki_texts(scale.scan_texts, split="val", seed=0),
        k=5,
        batch_size=1,
        max_len=scale.max_len,
        precision=scale.precision,
        progress=False,
    )
    assert full.saturation.equals(fresh.saturation)


def test_cli_has_the_reproduce_command():
    from beyond_top1.cli import build_parser

    args = build_parser().parse_args(
        ["reproduce", "--out", "x", "--scale", "paper", "--set", "scan_texts=3", "--no-twins"]
    )
    assert args.scale == "paper" and args.set == ["scan_texts=3"] and args.no_twins
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "--out", "x", "--scale", "huge"])


@pytest.mark.slow
def test_paper_only_stages_run_on_tiny_models(tmp_path):
    """Tuned lens, probes and interventions on the twins, refinement gap, sub-module
    replacement: the stages the paper scale adds, at the smallest settings."""
    from conftest import make_tiny_model

    overrides = {
        "tuned_lens": True,
        "tuned_steps": 2,
        "tuned_texts": 12,
        "twin_analyses": True,
        "intervention_a": None,
        "refinement_items": 1,
        "replacement_fit_texts": 2,
        "replacement_eval_texts": 1,
    }
    result = rp.reproduce(
        make_tiny_model(n_layers=6),
        tmp_path / "run",
        scale="test",
        overrides=overrides,
        twins={"twin": make_tiny_model(n_layers=6, seed=3)},
        progress=False,
        log=None,
    )
    records = result.records
    for name in ("lens-tuned", "refinement", "replacement", "probe-twin", "interventions-twin"):
        assert name in records, sorted(records)
    assert records["lens-tuned"].ok and records["replacement"].ok
    assert records["probe-twin"].status in ("done", "unavailable")
    # the tiny model's 64-token context is shorter than the retrieval prompts: said, not raised
    refinement = records["refinement"]
    assert refinement.ok or "context" in refinement.metrics["reason"]
    assert {"logit", "linear", "tuned"} <= set(records["lens-metrics"].metrics)
    page = result.report.read_text(encoding="utf-8")
    assert "Refinement gap and sub-module replacement" in page


def test_auto_threads_leave_the_busy_cores(monkeypatch):
    import os

    import torch

    from beyond_top1.runtime import resolve_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert resolve_threads("auto")[0] is None  # idle: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert resolve_threads("auto")[0] == 1  # one core busy
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 0.0, 0.0))
    assert resolve_threads("auto")[0] == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert resolve_threads("auto")[0] is None  # plenty of free cores
    assert resolve_threads("3")[0] == 3
    with pytest.raises(ValueError, match="threads must be >= 1"):
        resolve_threads("0")


def test_the_model_itself_is_not_a_twin(tmp_path):
    with pytest.raises(ValueError, match="model itself"):
        rp.reproduce("untrained:gpt2-small", tmp_path, scale="test", twins=["untrained:gpt2-small"])
