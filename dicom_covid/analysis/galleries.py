"""Which dataset images may be shown in a committed figure, and how they are sampled.

Galleries and figures that are committed (``monai_bundle/docs/``, the README) show dataset images,
downscaled and with overlays: a derivative that is published. The licence of each image comes
from the manifest's ``license`` and ``license_status`` columns (see the data folder's README,
"Licences and license_status"). One rule decides, for every command that draws such a figure
(``dicom-covid heatmap --gallery --redistributable``, ``dicom-covid lungs evaluate --contours``):

* shown: ``CC BY`` with an optional version (``CC BY 3.0``, ``CC BY 4.0``; credit is given in the
  figure or next to it), ``CC0`` (optionally ``1.0``) and ``public domain``;
* not shown: licences with NC, SA or ND terms (``CC BY-NC-SA 4.0``: a figure of the project must
  not be bound to non-commercial use or the share-alike terms), free-text grants ("listed as
  authorized for everyone", "usable without restriction, with citation"), unspecified and
  unverified licences, and any row whose ``license_status`` is present and not ``open``.

Sampling: :func:`spread` takes images evenly spaced through a list (deterministic, no seed),
:func:`pick_by_outcome` scans a seeded sample of each class for correctly and wrongly classified
images. RESEARCH USE ONLY.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from ..reader import XrayImage
    from ..training.data import ManifestRow

__all__ = [
    "GALLERY_LICENCE_RULE",
    "licence_allows_gallery",
    "may_show",
    "pick_by_outcome",
    "showable",
    "spread",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The rule in one sentence, for reports and help texts.
GALLERY_LICENCE_RULE = (
    "only images licensed CC BY (any version, no NC/SA/ND terms), CC0 or public domain, with "
    "license_status 'open' where the manifest has it"
)

_ALLOWED = re.compile(r"CC BY(?: \d(?:\.\d)?)?|CC0(?: 1\.0)?|PUBLIC DOMAIN")


def licence_allows_gallery(licence: str | None) -> bool:
    """True when an image under ``licence`` may be shown, downscaled, in a committed figure.

    Parameters
    ----------
    licence : str or None
        The manifest's ``license`` text (case and spacing do not matter; ``CC-BY`` is read as
        ``CC BY``).

    Returns
    -------
    bool
        See the module docstring for the rule.
    """
    if not licence:
        return False
    text = " ".join(licence.upper().replace("CC-BY", "CC BY").split())
    return _ALLOWED.fullmatch(text) is not None


def may_show(row: ManifestRow) -> bool:
    """True when the manifest row's image may be shown in a committed figure.

    Parameters
    ----------
    row : ManifestRow
        A manifest row (its ``extra`` holds ``license`` and, in the development set,
        ``license_status``).

    Returns
    -------
    bool
        :func:`licence_allows_gallery` of its licence, and ``license_status`` is ``open`` when the
        manifest has that column.
    """
    status = row.extra.get("license_status")
    if status is not None and status.strip().lower() != "open":
        return False
    return licence_allows_gallery(row.extra.get("license"))


def showable(items: Iterable[T], row_of: Callable[[T], ManifestRow] | None = None) -> list[T]:
    """The items whose image may be shown (:func:`may_show`), in their order.

    Parameters
    ----------
    items : iterable
        Manifest rows, or objects holding one (e.g. :class:`~dicom_covid.lungs.reference.LungCase`
        with ``row_of=lambda c: c.row``).
    row_of : callable, optional
        Gets the manifest row of an item (default: the item is the row).

    Returns
    -------
    list
    """
    get = row_of or (lambda item: item)
    return [item for item in items if may_show(get(item))]


def spread(items: Sequence[T], n: int) -> list[T]:
    """Up to ``n`` items evenly spaced through ``items`` (every ``len // n``-th, from the first).

    Parameters
    ----------
    items : sequence
        Candidates, in a fixed order.
    n : int
        How many to take (0 or less: none).

    Returns
    -------
    list
    """
    if n <= 0:
        return []
    return list(items[:: max(1, len(items) // n)][:n])


def pick_by_outcome(
    predictor: Any,
    rows: Sequence[ManifestRow],
    per_class: int,
    max_scan: int,
    seed: int,
    progress: bool,
) -> tuple[dict[str, dict[str, list[tuple[XrayImage, np.ndarray, ManifestRow]]]], dict[str, int]]:
    """Up to ``per_class`` correctly and wrongly classified images per true class.

    Each class's rows are visited in a seeded random order (at most ``max_scan`` of them) and
    classified in batches of 8 until both lists are full. Filter ``rows`` with :func:`showable`
    first when the figure is to be published.

    Parameters
    ----------
    predictor : dicom_covid.inference.Predictor
        The model (``labels`` and ``probabilities``).
    rows : sequence of ManifestRow
        Candidates.
    per_class : int
        Images wanted per class and outcome.
    max_scan : int
        Images per class classified at most.
    seed : int
        Seed of the order.
    progress : bool
        Show a progress bar.

    Returns
    -------
    picks : dict
        ``{label: {"correct": [(image, probabilities, row), ...], "wrong": [...]}}``.
    scanned : dict
        Images classified per label.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from ..errors import InputRejected
    from ..reader import read_image

    labels = list(predictor.labels)
    rng = np.random.default_rng(seed)
    picks: dict[str, dict[str, list[tuple[XrayImage, np.ndarray, ManifestRow]]]] = {}
    scanned: dict[str, int] = {}
    bar = tqdm(total=0, desc="scanning", unit="img", disable=not progress)
    for label in labels:
        cands = [r for r in rows if r.label == label]
        order = rng.permutation(len(cands))[:max_scan]
        picks[label] = {"correct": [], "wrong": []}
        scanned[label] = 0
        bar.total += len(order)
        for start in range(0, len(order), 8):
            if all(len(v) >= per_class for v in picks[label].values()):
                break
            images, used = [], []
            for i in order[start : start + 8]:
                bar.update()
                try:
                    images.append(read_image(cands[int(i)].path))
                    used.append(cands[int(i)])
                except InputRejected as exc:
                    logger.warning("gallery: skipped a %s image (%s)", label, exc.reason)
            scanned[label] += len(images)
            if not images:
                continue
            probs = predictor.probabilities(images)
            for image, p, row in zip(images, probs, used, strict=True):
                kind = "correct" if labels[int(np.argmax(p))] == label else "wrong"
                if len(picks[label][kind]) < per_class:
                    picks[label][kind].append((image, p, row))
    bar.close()
    return picks, scanned
