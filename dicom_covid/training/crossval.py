"""Leave-source-out validation: train without a group of sources, test on that group only.

Sources predict labels in the development set (see its README), so a score on the ``test``
split says little about a hospital the model has never seen. A *held-out group* is a set of
manifest sources; :func:`crossval` trains a recipe (:data:`~dicom_covid.training.train.RECIPES`)
on the ``train`` split without the group (model selection on ``val`` without the group) and
measures it on every image of the group (all splits: none of them was seen).

Groups that hold one class only (e.g. the NIH additions hold no COVID-19) report that class's
recall and, where COVID-19 is absent, the COVID-19 specificity at the model's threshold.

Ablations switch ingredients of the ``transfer`` recipe off (:attr:`TrainConfig.without
<dicom_covid.training.train.TrainConfig>`); each result records its ``variant`` (e.g.
``"transfer−clahe"``) and :func:`ablation_table` sets the variants of a group side by side,
with the AUC change against the full recipe and its paired bootstrap interval.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..reader import read_image
from .data import LABELS, read_manifest
from .metrics import binary_auc, bootstrap_auc_ci
from .train import TRANSFER_INGREDIENTS, TrainConfig, recipe_variant, train

__all__ = [
    "GROUPS",
    "ablation_table",
    "crossval",
    "evaluate_heldout",
    "paired_auc_difference",
    "summary_table",
]

logger = logging.getLogger(__name__)

#: Held-out groups of manifest sources, by name.
GROUPS: dict[str, tuple[str, ...]] = {
    "ieee8023+figure1+actualmed": ("ieee8023", "figure1", "actualmed"),
    "c19r_covid+c19r_rsna": ("c19r_covid", "c19r_rsna"),
    "nih_pneumonia+nih_normal+quex_opacity": ("nih_pneumonia", "nih_normal", "quex_opacity"),
    "kermany": ("kermany",),
}


def group_sources(group: str) -> tuple[str, ...]:
    """Sources of a group name: a key of :data:`GROUPS` or sources joined with ``+``."""
    return GROUPS.get(group, tuple(s for s in group.split("+") if s))


def evaluate_heldout(
    run_dir: str | Path, data_dir: str | Path, sources: tuple[str, ...], progress: bool = True
) -> dict[str, Any]:
    """Metrics of a finished run on every image of ``sources``.

    Returns
    -------
    dict
        ``n``, ``counts`` per label, ``accuracy``, ``covid_auc`` (COVID-19 vs rest, with a 95 %
        bootstrap interval, None when the group holds one class), ``covid_sensitivity`` and
        ``covid_specificity`` at the model's threshold (None where undefined), per-source
        accuracy, and the probabilities per image (path relative to the data folder).
    """
    from ..inference import Predictor

    predictor = Predictor.from_run(run_dir)
    rows = [r for r in read_manifest(data_dir) if r.source in set(sources)]
    probs = []
    for i in tqdm(range(0, len(rows), 32), desc="held-out group", disable=not progress):
        batch = [read_image(r.path) for r in rows[i : i + 32]]
        probs.append(predictor.probabilities(batch))
    p = np.concatenate(probs)
    y = np.array([r.label_index for r in rows])
    covid = LABELS.index("covid")
    is_covid = (y == covid).astype(int)
    suspected = p[:, covid] >= predictor.facts.covid_threshold
    auc = ci = None
    if 0 < is_covid.sum() < len(is_covid):
        auc, ci = bootstrap_auc_ci(is_covid, p[:, covid])
    sens = float(suspected[is_covid == 1].mean()) if is_covid.any() else None
    spec = float((~suspected[is_covid == 0]).mean()) if (is_covid == 0).any() else None
    per_source = {
        s: float((p.argmax(1) == y)[[r.source == s for r in rows]].mean())
        for s in sorted({r.source for r in rows})
    }
    return {
        "sources": list(sources),
        "n": len(rows),
        "counts": {lab: int((y == i).sum()) for i, lab in enumerate(LABELS)},
        "accuracy": float((p.argmax(1) == y).mean()),
        "covid_auc": auc,
        "covid_auc_ci": ci,
        "covid_threshold": predictor.facts.covid_threshold,
        "covid_sensitivity": sens,
        "covid_specificity": spec,
        "accuracy_per_source": per_source,
        "predictions": [
            {"path": str(r.path.relative_to(Path(data_dir))), "label": r.label, "probs": q.tolist()}
            for r, q in zip(rows, p, strict=True)
        ],
    }


def crossval(cfg: TrainConfig, group: str, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` without ``group`` and evaluate on it; writes ``heldout.json``.

    Parameters
    ----------
    cfg : TrainConfig
        The recipe and budget; ``exclude_sources`` is replaced by the group's sources.
    group : str
        A :data:`GROUPS` key or sources joined by ``+``.
    progress : bool
        Progress bars.

    Returns
    -------
    dict
        The held-out metrics (see :func:`evaluate_heldout`) plus the run's settings.
    """
    sources = group_sources(group)
    known = {r.source for r in read_manifest(cfg.data_dir)}
    unknown = sorted(set(sources) - known)
    if unknown:
        raise DataError(
            f"sources {unknown} are not in {cfg.data_dir}/manifest.csv; known sources: "
            f"{', '.join(sorted(known))}"
        )
    cfg = replace(cfg, exclude_sources=sources)
    result = train(cfg)
    metrics = evaluate_heldout(cfg.output_dir, cfg.data_dir, sources, progress)
    metrics.update(
        {
            "group": group,
            "recipe": cfg.recipe,
            "without": [name for name in TRANSFER_INGREDIENTS if name in set(cfg.without)],
            "variant": recipe_variant(cfg.recipe, cfg.without),
            "max_train_per_class": cfg.max_train_per_class,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "val_macro_auc_without_group": result.best_val_auc,
            "train_config": json.loads(json.dumps(asdict(cfg), default=str)),
        }
    )
    out = Path(cfg.output_dir) / "heldout.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info(
        "%s without %s: accuracy %.3f, COVID AUC %s on %d held-out images",
        metrics["variant"],
        group,
        metrics["accuracy"],
        "n/a" if metrics["covid_auc"] is None else f"{metrics['covid_auc']:.3f}",
        metrics["n"],
    )
    return metrics


def _fmt(v: float | None, ci: list[float] | None = None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def _variant(m: dict[str, Any]) -> str:
    """Variant name of a result (results written before ablations existed have none)."""
    return m.get("variant") or recipe_variant(m["recipe"], m.get("without") or ())


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of held-out results, one row per group and recipe variant."""
    lines = [
        "| held-out group | recipe | n (covid/normal/pneumonia) | COVID-vs-rest AUC (95 % CI) "
        "| COVID sens @thr | COVID spec @thr | 3-class acc |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for m in sorted(results, key=lambda r: (r["group"], r["recipe"] != "v1", _variant(r))):
        c = m["counts"]
        lines.append(
            f"| {m['group']} | {_variant(m)} | {m['n']} ({c['covid']}/{c['normal']}/"
            f"{c['pneumonia']}) | {_fmt(m['covid_auc'], m['covid_auc_ci'])} | "
            f"{_fmt(m['covid_sensitivity'])} | {_fmt(m['covid_specificity'])} | "
            f"{m['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def paired_auc_difference(
    a: dict[str, Any], b: dict[str, Any], n_resamples: int = 1000, seed: int = 0
) -> tuple[float, list[float]] | None:
    """COVID-vs-rest AUC of ``a`` minus that of ``b`` on the same images, with a paired interval.

    Both results are resampled with the same image indices (COVID-19 and other images resampled
    separately, as in :func:`~dicom_covid.training.metrics.bootstrap_auc_ci`), so the interval
    reflects the difference between the two models on this group, not the spread of each AUC.
    It does not include training noise (another seed gives another model).

    Parameters
    ----------
    a, b : dict
        Held-out results (``heldout.json``) with per-image ``predictions``.
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    tuple or None
        ``(difference, [low, high])`` (95 % percentile interval); None when the results do not
        hold predictions for the same images or the group holds one class only.
    """
    covid = LABELS.index("covid")
    pa = {p["path"]: p for p in a.get("predictions") or []}
    pb = {p["path"]: p for p in b.get("predictions") or []}
    if not pa or set(pa) != set(pb):
        return None
    paths = sorted(pa)
    y = np.array([pa[k]["label"] == "covid" for k in paths])
    sa = np.array([pa[k]["probs"][covid] for k in paths])
    sb = np.array([pb[k]["probs"][covid] for k in paths])
    if y.all() or not y.any():
        return None
    diff = binary_auc(y, sa) - binary_auc(y, sb)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        stats[i] = binary_auc(y[idx], sa[idx]) - binary_auc(y[idx], sb[idx])
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(diff), [float(low), float(high)]


def _settings(m: dict[str, Any]) -> tuple[Any, ...]:
    cfg = m.get("train_config") or {}
    return (
        m.get("image_size"),
        m.get("max_train_per_class", cfg.get("max_train_per_class")),
        m.get("epochs", cfg.get("epochs")),
        m.get("seed", cfg.get("seed")),
    )


def ablation_table(results: list[dict[str, Any]], recipe: str = "transfer") -> str:
    """Markdown table of the variants of ``recipe`` per held-out group, against the full recipe.

    The reference of a group is its run of the full recipe (nothing switched off) at the
    settings (input size, train images per class, epochs, seed) most of its runs share; every
    other run gets its COVID-vs-rest AUC change against it with a paired bootstrap 95 %
    interval (:func:`paired_auc_difference`). The last column, the val split's macro AUC on the
    sources the run was trained on, shows what the in-distribution score would have chosen.
    Rows: the reference, the ablations in
    :data:`~dicom_covid.training.train.TRANSFER_INGREDIENTS` order, then runs at other settings.

    Parameters
    ----------
    results : list of dict
        Held-out results (``heldout.json``); those of other recipes are left out.
    recipe : str
        The recipe whose ingredients were switched off.

    Returns
    -------
    str
        One table; a group without a reference run gets no change column values.
    """
    lines = [
        "| held-out group | variant | input px / train per class / epochs / seed "
        "| COVID-vs-rest AUC (95 % CI) | ΔAUC vs full recipe (paired 95 % CI) "
        "| COVID sens @thr | COVID spec @thr | 3-class acc | val macro AUC (seen sources) |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(TRANSFER_INGREDIENTS)}
    for group in sorted({r["group"] for r in results if r["recipe"] == recipe}):
        runs = [r for r in results if r["recipe"] == recipe and r["group"] == group]
        keys = [_settings(r) for r in runs]
        common = max(set(keys), key=keys.count)
        refs = [r for r in runs if not r.get("without") and _settings(r) == common]
        ref = refs[0] if refs else None

        def rank(r: dict[str, Any], common: tuple[Any, ...] = common) -> tuple[Any, ...]:
            off = r.get("without") or []
            return (
                _settings(r) != common,
                len(off),
                [order.get(x, len(order)) for x in off],
                [-1 if v is None else v for v in _settings(r)],
            )

        for m in sorted(runs, key=rank):
            size, per_class, epochs, seed = _settings(m)
            if m is ref:
                delta = "(reference)"
            else:
                d = paired_auc_difference(m, ref) if ref is not None else None
                delta = "–" if d is None else f"{d[0]:+.3f} ({d[1][0]:+.2f} to {d[1][1]:+.2f})"
            lines.append(
                f"| {group} | {_variant(m)} | {size} / {per_class} / {epochs} / {seed} | "
                f"{_fmt(m['covid_auc'], m['covid_auc_ci'])} | {delta} | "
                f"{_fmt(m['covid_sensitivity'])} | {_fmt(m['covid_specificity'])} | "
                f"{m['accuracy']:.3f} | {_fmt(m.get('val_macro_auc_without_group'))} |"
            )
    return "\n".join(lines)
