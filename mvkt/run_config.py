"""What a run config means: the parsers of its list-, dict- and legacy string-valued fields,
which group describes the net being trained, and the upgrade of run folders written
before ``config.teacher`` existed.

Every field is parsed here, once: the trainer, the study runners and the sweep call these
functions instead of splitting strings themselves.

| field | accepted forms |
|---|---|
| ``student.leads``, ``teacher.leads`` | ``"I"``, ``"I,II,V2"``, ``"all"``, a list/tuple of names |
| ``teacher.runs`` | a tuple/list of run folders; ``"A,B"`` (the old ``teacher_workdir`` form) |
| ``data.{train,val,test}_folds`` | ``"1,2"``, a list/tuple of ints (or of such strings) |
| ``mkd_class_weights`` | ``"CD:1,HYP:0"``, a dict ``{"CD": 1, "HYP": 0}`` |
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from mvkt import data as data_lib

METHODS = ("bce", "kd", "mkd", "clt", "mvkt")
CLT_VARIANTS = ("memory_bank", "in_batch")
TRAINED_NETS = ("student", "teacher")  # config.trains: which group describes the net being trained
NET_FIELDS = ("arch", "width_mult", "leads", "dtype")

# Run folders written before config.teacher: top-level field -> its place now.
_LEGACY_TEACHER_FIELDS = {
    "teacher_workdir": "runs",
    "teacher_cache": "cache",
    "teacher_cache_stride_seconds": "cache_stride_seconds",
    "teacher_cross_fit": "cross_fit",
    "allow_unfinished_teacher": "allow_unfinished",
}


def _items(value: str | Sequence | None) -> list[str]:
    """A comma-separated string, or a sequence whose items may themselves be comma-separated
    (the command line gives ``('1,2',)`` for a tuple field set to ``1,2`` of non-numbers)."""
    if value is None:
        return []
    parts = [value] if isinstance(value, (str, int, os.PathLike)) else list(value)
    return [s.strip() for part in parts for s in str(part).split(",") if s.strip()]


def parse_leads(leads: str | Sequence[str]) -> list[str]:
    """'I' | 'I,II,V2' | 'all' | a list -> validated lead names in the order given."""
    names = _items(leads)
    if [n.lower() for n in names] == ["all"]:
        names = list(data_lib.LEADS)
    data_lib.lead_indices(names)  # raises a clear error for unknown names
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate leads in {leads!r}")
    return names


def fold_splits(data_config: ml_collections.ConfigDict) -> dict[str, list[int]] | None:
    """{"train": [...], "val": [...], "test": [...]} from ``data.{train,val,test}_folds``, or
    None when none is set (the shards' own splits)."""
    given = {name: _items(data_config.get(f"{name}_folds")) for name in data_lib.SPLITS}
    if not any(given.values()):
        return None
    if not all(given.values()):
        raise ValueError(f"set all of data.train_folds, data.val_folds, data.test_folds or none: {given}")
    try:
        folds = {name: [int(f) for f in items] for name, items in given.items()}
    except ValueError:
        raise ValueError(f"fold lists must be integers (\"1,2\" or [1, 2]): {given}") from None
    flat = [f for fs in folds.values() for f in fs]
    if len(flat) != len(set(flat)):
        raise ValueError(f"a fold is in two splits: {folds}")
    return folds


def mkd_class_weights(config: ml_collections.ConfigDict, label_names: Sequence[str],
                      num_classes: int) -> np.ndarray | None:
    """``config.mkd_class_weights`` ("CD:1,HYP:0" or {"CD": 1, "HYP": 0}; unlisted classes 1)
    as a (C,) array, or None."""
    value = config.get("mkd_class_weights") or ""
    if not value:
        return None
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        pairs = [(str(k), v, f"{k}: {v}") for k, v in value.items()]
    else:
        pairs = [(*item.partition(":")[::2], item) for item in _items(value)]
    weights = np.ones(num_classes, np.float32)
    for name, weight, item in pairs:
        if name.strip() not in label_names:
            raise ValueError(f"config.mkd_class_weights names {name.strip()!r}, not one of the labels "
                             f"{list(label_names)}")
        try:
            weights[list(label_names).index(name.strip())] = float(weight)
        except ValueError:
            raise ValueError(f"config.mkd_class_weights: {item!r} is not CLASS:WEIGHT") from None
    return weights


def path_list(value: str | Sequence[str] | None) -> list[str]:
    """Run folders given as a list/tuple, or joined by commas (the old ``teacher_workdir``)."""
    return _items(value)


def teacher_runs(config: ml_collections.ConfigDict) -> list[str]:
    """The run folders ``config.teacher.runs`` lists (one teacher, or an ensemble)."""
    return _items(config.teacher.runs)


def net_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The group (``student`` or ``teacher``) describing the net this run trains."""
    trains = config.trains
    if trains not in TRAINED_NETS:
        raise ValueError(f"config.trains must be one of {TRAINED_NETS}, not {trains!r}")
    return config[trains]


def trained_leads(config: ml_collections.ConfigDict) -> list[str]:
    return parse_leads(net_config(config).leads)


# Fields checked before training: (field, allowed, description of the allowed range).
_RANGES = (
    ("train.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.learning_rate", lambda v: v > 0, "a number > 0"),
    ("train.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("train.grad_clip_norm", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    ("train.log_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, "an integer >= 1"),
    ("train.stop_at_step", lambda v: v >= 0, "an integer >= 0 (0: no planned stop)"),
    ("train.steps_per_dispatch", lambda v: v >= 1, "an integer >= 1"),
    ("train.checkpoint_every_epochs", lambda v: v >= 1, "an integer >= 1"),
    ("data.crop_seconds", lambda v: v > 0, "a number of seconds > 0"),
    ("data.eval_stride_fraction", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("eval.every_epochs", lambda v: v >= 1, "an integer >= 1"),
    ("eval.batch_size", lambda v: v >= 1, "an integer >= 1"),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses, in one line naming the field and its allowed range, a config that would train
    nothing or diverge at once (epochs 0, a negative learning rate, batch 0, ...)."""
    for field, allowed, description in _RANGES:
        group, name = field.split(".")
        value = config[group][name]
        if not allowed(value):
            raise ValueError(f"config.{field}={value!r}: must be {description}")


def check_crop(config: ml_collections.ConfigDict, crop_length: int, longest_samples: int, sampling_rate: int) -> None:
    """A crop longer than every training record would train on zero padding."""
    if crop_length > longest_samples:
        raise ValueError(f"config.data.crop_seconds={config.data.crop_seconds:g}: longer than every training "
                         f"record ({longest_samples / sampling_rate:g} s at most); use at most that")


def upgrade(raw: Mapping[str, Any]) -> dict:
    """A run folder's config.json in today's layout: folders written before ``config.teacher``
    kept its fields at the top level (``teacher_workdir="A,B"``, ``teacher_cache``, ...) and
    described every trained net, teachers too, in ``config.student``."""
    config = copy.deepcopy(dict(raw))
    config.setdefault("eval", {}).setdefault("evaluators", ["val_auc"])
    config.setdefault("augment", {}).setdefault("nstdb_snr_max_db", 24.0)  # added with the NSTDB noise
    config.setdefault("train", {}).setdefault("optimizer", "adamw")  # added with the official recipe
    config["train"].setdefault("steps_per_dispatch", 1)  # added with device-resident data
    config["train"].setdefault("device_data_gb", -1.0)
    config["train"].setdefault("checkpoint_every_epochs", 1)
    if "teacher" in config and "trains" in config:
        return config
    teacher = {new: config.pop(old) for old, new in _LEGACY_TEACHER_FIELDS.items() if old in config}
    teacher["runs"] = tuple(_items(teacher.get("runs")))
    teacher["source"] = "runs"
    # The old layout's trained net was config.student; no other teacher net was described.
    teacher.update({f: config.get("student", {}).get(f) for f in NET_FIELDS})
    config["teacher"] = teacher
    config["trains"] = "student"
    return config


def training_fields(raw: Mapping[str, Any]) -> dict:
    """The flattened fields that decide what a run trains, in today's layout: the trained net
    under ``net.*`` and the other net's group left out (it describes nothing of this run)."""
    config = upgrade(raw)
    trains = config["trains"]
    net = config.get(trains, {})
    flat = _flatten({k: v for k, v in config.items() if k not in ("student", "trains")})
    for field in NET_FIELDS:
        flat.pop(f"teacher.{field}", None)
        flat[f"net.{field}"] = net.get(field)
    flat["net.leads"] = parse_leads(flat["net.leads"]) if flat["net.leads"] else flat["net.leads"]
    flat["teacher.runs"] = _items(flat.get("teacher.runs"))
    for split in data_lib.SPLITS:
        flat[f"data.{split}_folds"] = _items(flat.get(f"data.{split}_folds"))
    return flat


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
