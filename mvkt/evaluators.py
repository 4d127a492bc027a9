"""What a run measures while it trains, and when (big_vision's ``evaluators`` in spirit).

``config.eval.evaluators`` names registered evaluators (default ``("val_auc",)``); each
runs at the validation points (every ``config.eval.every_epochs`` epochs and at the last
step) on the current net and returns metrics that are logged to ``metrics.jsonl`` in
one row. ``val_macro_auc`` (None when undefined) selects the best checkpoint.
``register`` adds an evaluator (docs/DESIGN.md, "How to add an evaluator").
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import flax.linen as nn
import ml_collections
from absl import logging

from mvkt import data as data_lib
from mvkt import dispatch
from mvkt import inference
from mvkt import metrics as metrics_lib
from mvkt import parallel as parallel_lib

SELECTION_METRIC = "val_macro_auc"


@dataclasses.dataclass(frozen=True)
class Context:
    """What an evaluator may use: the run's config, its net and leads, validation data and the
    sliding-window geometry of its inference."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    model: nn.Module
    lead_index: list[int]  # the net's leads in the 12-lead crop
    parallel: parallel_lib.Parallelism
    val_split: data_lib.Split
    label_names: list[str]
    window: int
    stride: int


# evaluator(variables) -> {metric: value}; variables are the net's {"params", "batch_stats"}.
Evaluator = Callable[[dict], dict]
EVALUATORS: dict[str, Callable[[Context], Evaluator]] = {}


def register(name: str, factory: Callable[[Context], Evaluator]) -> None:
    if name in EVALUATORS:
        raise ValueError(f"an evaluator {name!r} exists already")
    EVALUATORS[name] = factory


def build(names: Sequence[str], context: Context) -> list[Evaluator]:
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"config.eval.evaluators: unknown {unknown}; registered: {sorted(EVALUATORS)}")
    return [EVALUATORS[n](context) for n in names]


def evaluate(evaluators: Sequence[Evaluator], variables: dict) -> dict:
    results: dict = {}
    for evaluator in evaluators:
        results.update(evaluator(variables))
    return results


def _validation_auc(context: Context) -> Evaluator:
    """Validation macro-AUC (None when no class has both positives and negatives there) and
    the per-class AUCs that are defined, from the run's own sliding-window inference."""
    forward = inference.make_forward_fn(context.model, context.lead_index, context.parallel)
    split, config = context.val_split, context.config
    defined = metrics_lib.valid_class_mask(y_true=split.y).any()
    if not defined:
        logging.warning(
            "%s: no class of the validation split (%d records) has both positives and negatives: "
            "validation macro-AUC is undefined, the best checkpoint is the latest until it is defined",
            context.workdir, len(split))

    # The windows are cut once per run and stay on the devices when they fit the budget of the
    # training data (config.train.device_data_gb): no host work per validation but reading scores.
    geometry = {"window": context.window, "stride": context.stride, "batch_size": int(config.eval.batch_size)}
    fits = (inference.window_bytes(split, **geometry)
            <= dispatch.memory_budget_bytes(float(config.train.device_data_gb)))
    prepared = inference.prepare_windows(split, **geometry, parallel=context.parallel) if fits else None

    def evaluator(variables: dict) -> dict:
        if prepared is not None:
            scores = inference.predict_prepared(forward, variables, prepared, aggregate=config.eval.aggregate)
        else:
            scores = inference.predict_records(forward, variables, split, **geometry, parallel=context.parallel,
                                               aggregate=config.eval.aggregate)
        if not defined:
            return {SELECTION_METRIC: None}
        result = metrics_lib.per_class_auc(y_true=split.y, y_score=scores, label_names=context.label_names)
        per_class = {f"val_auc/{k}": v for k, v in result.per_class_auc.items() if v is not None}
        return {SELECTION_METRIC: result.macro_auc, **per_class}

    return evaluator


register("val_auc", _validation_auc)
