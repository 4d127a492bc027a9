"""Declaring hyper-parameter sweeps (big_vision style) and applying them to configs.

A sweep config file (``experiments/configs/sweep_*.py``) defines ``get_config(arg)``
as any training config and ``get_hyper(hyper)`` (or ``get_hyper(hyper, arg)`` when
one file holds several named sweeps) returning a list of override dicts built with
this module::

    def get_hyper(hyper):
        return hyper.product([hyper.sweep("config.alpha", [0.5, 1.0, 2.0]),
                              hyper.sweep("config.beta", [0.4, 0.8, 1.6])])   # 9 runs

Every dict maps dotted names (``"config.clt.temperature"``) to values; one dict is
one run. ``apply_overrides`` turns a base config and such a dict into the run's
config, refusing unknown fields and values of the wrong type.
"""

from __future__ import annotations

import builtins
import itertools
from typing import Any, Iterable, Sequence

import ml_collections

PREFIX = "config."


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.startswith(PREFIX) or len(name) == len(PREFIX):
        raise ValueError(f"sweep names are dotted config paths starting with {PREFIX!r} "
                         f"(e.g. 'config.alpha'), got {name!r}")
    return name


def sweep(name: str, values: Iterable[Any]) -> list[dict]:
    """One run per value of ``name``."""
    _check_name(name)
    values = list(values)
    if not values:
        raise ValueError(f"sweep over {name!r} has no values")
    return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[dict]:
    """A single setting; composes with ``product``/``zip`` like a one-value sweep."""
    return sweep(name, [value])


def _merge(dicts: Sequence[dict]) -> dict:
    merged: dict = {}
    for d in dicts:
        for key, value in d.items():
            if key in merged:
                raise ValueError(f"{key!r} is set by two of the combined sweeps")
            merged[key] = value
    return merged


def product(sweeps: Sequence[list[dict]]) -> list[dict]:
    """Cartesian product: every combination, the last sweep varying fastest."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip(sweeps: Sequence[list[dict]]) -> list[dict]:  # noqa: A001 (big_vision's name)
    """Element-wise combination of sweeps of equal length."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"hyper.zip needs sweeps of equal length, got lengths {[len(s) for s in sweeps]}")
    return [_merge(combo) for combo in builtins.zip(*sweeps)]


def field_path(name: str) -> str:
    """'config.clt.temperature' or 'clt.temperature' -> 'clt.temperature'."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Leaves of a (nested) config as ``{"clt.temperature": 0.07, ...}``."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, prefix=path + "."))
        else:
            out[path] = value
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], *,
                    source: str = "override") -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``overrides`` set; names may carry the ``config.`` prefix.

    Unknown fields are errors (a typo would otherwise silently sweep nothing), and so
    are values the field's type cannot hold (ints are widened to float fields, as the
    command line does).
    """
    result = ml_collections.ConfigDict(config.to_dict())
    for name, value in overrides.items():
        *parents, leaf = field_path(name).split(".")
        node = result
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"{source}: unknown config field {name!r} "
                                 f"(no group {'.'.join(parents[:i + 1])!r})")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"{source}: unknown config field {name!r}")
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"{source}: {name}={value!r}: {e}") from None
    result.lock()
    return result


def parse_override(config: ml_collections.ConfigDict, text: str) -> tuple[str, Any]:
    """``"clt.num_negatives=256"`` -> ``("clt.num_negatives", 256)``, typed like the field in ``config``."""
    name, sep, raw = text.partition("=")
    name = field_path(name.strip())
    if not sep or not name:
        raise ValueError(f"override {text!r} is not of the form field=value (e.g. clt.num_negatives=256)")
    current = flatten(config)
    if name not in current:
        raise ValueError(f"override {text!r}: unknown config field {name!r}")
    kind = type(current[name])
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"override {text!r}: {name} needs true or false")
        return name, raw.lower() in ("true", "1")
    try:
        return name, kind(raw)
    except ValueError:
        raise ValueError(f"override {text!r}: {name} needs a {kind.__name__}") from None
