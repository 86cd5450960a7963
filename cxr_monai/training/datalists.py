"""Datalist items for one role of a run: what the bundle configs' ``dataset`` sections load."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import WeightedRandomSampler

from cxr_monai.data import get_test_items, items_for_fold, load_datalist, num_folds
from cxr_monai.errors import DatasetError

logger = logging.getLogger(__name__)


def datalist_sources(content: dict[str, Any]) -> list[str]:
    """The datalist's sources (training and test items), sorted; an item without one counts as "None"."""
    return sorted({str(item.get("source")) for item in content["training"] + content["test"]})


def check_sources(content: dict[str, Any], names: Sequence[str]) -> None:
    """DatasetError naming the sources present when one of ``names`` is not a ``source`` of the datalist."""
    present = datalist_sources(content)
    unknown = [name for name in names if name not in present]
    if unknown:
        raise DatasetError(
            f"--exclude-source {', '.join(unknown)}: not a source of this datalist; its sources are "
            f"{', '.join(present)}"
        )


def fold_items(
    datalist: str, fold: int, role: str, exclude_sources: Sequence[str] = (), with_source: bool = False
) -> list[dict[str, Any]]:
    """Items of the datalist written by ``cxr-monai prepare`` for one role of a run.

    ``role``: ``"train"`` = training items outside ``fold`` (all of them when ``fold < 0``),
    ``"validate"`` = real (not ``synthetic``) training items of ``fold`` (none when ``fold < 0``); for
    ``"train"`` with ``fold >= 0`` synthetic items count only when their GAN never saw that fold
    (``gan_fold == fold``), since a GAN trained on fold K's COVID-19 images leaks them into the run,
    ``"test"`` = the held-out test items, ``"training"`` = every training item. Each item is reduced to
    ``{"image": path, "label": index into CLASS_NAMES}``: the other keys vary by source (``offset`` may be
    null, Kaggle items have no ``view``), which batch collation refuses, and patient data has no business
    in a batch.
    ``exclude_sources``: sources whose items are left out of ``train`` and ``validate`` (leave-one-source-out;
    ``test`` and ``training`` keep them, so the left-out source can still be scored).
    ``with_source``: items also get ``"source"``: the index of their source in :func:`datalist_sources`
    (the same index in every fold and role), the target of the source-adversarial head.
    Raises DatasetError for a missing/invalid datalist, an unknown source or an empty selection.
    """
    selected = _selected_items(datalist, fold, role, exclude_sources)
    items = [{"image": item["image"], "label": int(item["label"])} for item in selected]
    if with_source:
        index = {name: i for i, name in enumerate(datalist_sources(load_datalist(datalist)))}
        for item, entry in zip(items, selected, strict=True):
            item["source"] = index[str(entry.get("source"))]
    return items


def source_class_sampler(
    datalist: str, fold: int, exclude_sources: Sequence[str] = (), seed: int = 0
) -> WeightedRandomSampler:
    """A sampler over ``fold_items(datalist, fold, "train", exclude_sources)`` that draws every
    (source, class) cell equally often: item weight = 1 / size of its cell; as many draws per epoch as
    items, with replacement. Against source shortcuts: a class no longer comes mostly from one source."""
    selected = _selected_items(datalist, fold, "train", exclude_sources)
    cells = Counter((str(item.get("source")), int(item["label"])) for item in selected)
    weights = [1.0 / cells[(str(item.get("source")), int(item["label"]))] for item in selected]
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)


def _selected_items(
    datalist: str, fold: int, role: str, exclude_sources: Sequence[str]
) -> list[dict[str, Any]]:
    """The whole datalist entries behind :func:`fold_items` (same selection, same order)."""
    if not datalist:
        raise DatasetError("no datalist given: pass --datalist FILE (made by `cxr-monai prepare`)")
    content = load_datalist(datalist)
    check_sources(content, exclude_sources)
    if role in ("train", "validate"):
        train, validate = items_for_fold(content, None if fold < 0 else int(fold))
        # Synthetic (CycleGAN) items may train but never validate: validation measures real images only.
        selected = train if role == "train" else [item for item in validate if not item.get("synthetic")]
        if role == "train" and fold >= 0:
            kept = [i for i in selected if not i.get("synthetic") or i.get("gan_fold", -1) == fold]
            if len(kept) < len(selected):
                logger.warning(
                    "fold %d: %d synthetic items left out of training: their GAN saw this fold's images "
                    "(train the GAN with --fold %d to use them)",
                    fold,
                    len(selected) - len(kept),
                    fold,
                )
            selected = kept
        if role == "validate" and fold < 0:
            return []  # training on every item: nothing is held out
        selected = [item for item in selected if item.get("source") not in exclude_sources]
    elif role == "test":
        selected = get_test_items(content)
    elif role == "training":
        selected = list(content["training"])
    else:
        raise DatasetError(f"unknown datalist role {role!r}; expected train, validate, test or training")
    if not selected:
        raise DatasetError(f"datalist {datalist} has no {role} items for fold {fold}")
    return selected


def datalist_folds(datalist: str) -> list[int]:
    """The cross-validation folds of the datalist: 0..num_folds-1."""
    return list(range(num_folds(load_datalist(datalist))))
