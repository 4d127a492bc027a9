"""Flags shared by the data_prep CLIs, their parsing and error handling.

Only the CLI entry points (`python -m data_prep.ptbxl|cpsc2018|cinc`) use this; the
library functions take plain arguments. Flags live on a private `FlagValues` per
invocation and are appended to absl's global FLAGS only when run as a program, so that
importing data_prep (e.g. from the test fixtures) never registers flags that could
collide with the experiments' flags, and the CLIs can be called in-process:
`data_prep.ptbxl.main(["ptbxl", "--src=...", "--out=..."])`.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from data_prep.common import DTYPES, DataPrepError


def define_common_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_string("src", None, "Source folder (dataset release layout).", **d)
    flags.DEFINE_string("out", None, "Output folder for the shards (must not exist unless --overwrite).", **d)
    flags.DEFINE_bool("overwrite", False, "Replace an existing output folder (atomically, after success).", **d)
    flags.DEFINE_integer("sampling_rate", 100, "Output sampling rate in Hz.", **d)
    flags.DEFINE_list("band_pass", [], "Optional band-pass LO,HI in Hz (e.g. 0.5,40), applied at the "
                      "source rate before resampling; off by default.", **d)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored signal dtype.", **d)
    flags.DEFINE_float("max_rejected_fraction", 0.05,
                       "Fail when more than this fraction of records is rejected.", **d)
    flags.DEFINE_integer("num_workers", 0, "Reader processes (0: one per CPU core).", **d)
    flags.DEFINE_list("train_folds", [str(i) for i in range(1, 9)], "Folds of the train split.", **d)
    flags.DEFINE_list("val_folds", ["9"], "Folds of the validation split.", **d)
    flags.DEFINE_list("test_folds", ["10"], "Folds of the test split.", **d)


def define_fold_flags(fv: flags.FlagValues) -> None:
    """Only for datasets without official folds (CPSC 2018, CinC)."""
    flags.DEFINE_integer("num_folds", 10, "Number of iteratively stratified folds.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the stratified fold assignment.", flag_values=fv)


def _ints(fv: flags.FlagValues, name: str) -> list[int]:
    try:
        return [int(v) for v in fv[name].value]
    except ValueError:
        raise DataPrepError(f"--{name} must be a comma-separated list of fold numbers, "
                            f"got {','.join(fv[name].value)}") from None


def common_kwargs(fv: flags.FlagValues) -> dict:
    """Keyword arguments of the library `prepare` functions taken from the shared flags."""
    for name in ("src", "out"):
        if not fv[name].value:
            raise DataPrepError(f"--{name} is required")
    return dict(
        src=fv["src"].value,
        out=fv["out"].value,
        overwrite=fv["overwrite"].value,
        sampling_rate=fv["sampling_rate"].value,
        band_pass=fv["band_pass"].value or None,
        dtype=fv["dtype"].value,
        max_rejected_fraction=fv["max_rejected_fraction"].value,
        num_workers=fv["num_workers"].value or None,
        split_folds={s: _ints(fv, f"{s}_folds") for s in ("train", "val", "test")},
        progress=True,
    )


def prepare_and_summarize(fv: flags.FlagValues, prepare: Callable[..., dict], **own_kwargs) -> dict:
    """An importer's ``prepare`` with the shared flags' arguments and its own; prints the summary."""
    from data_prep.common import summarize

    kwargs = common_kwargs(fv)
    manifest = prepare(**own_kwargs, **kwargs)
    print(summarize(manifest, kwargs["out"]))
    return manifest


def run_or_exit(prog: str, fn: Callable[[], object]) -> object:
    """Run `fn`; a DataPrepError becomes one line on stderr and exit status 1 (no traceback)."""
    try:
        return fn()
    except DataPrepError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)


def main(prog: str, define: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], object],
         argv: list[str] | None = None) -> object:
    fv = flags.FlagValues()
    define(fv)
    if argv is None:  # a real command line: absl's app gives --help, --helpfull, logging flags
        flags.FLAGS.append_flag_values(fv)
        for name in list(fv):  # so that --help lists them as the main module's flags
            flags.FLAGS.register_flag_by_module(sys.argv[0], fv[name])

        def _main(rest):
            if len(rest) > 1:
                raise app.UsageError(f"unexpected arguments: {rest[1:]}")
            run_or_exit(prog, lambda: run(fv))

        app.run(_main)
        return None
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    if len(rest) > 1:
        print(f"{prog}: error: unexpected arguments: {rest[1:]}", file=sys.stderr)
        sys.exit(1)
    return run_or_exit(prog, lambda: run(fv))
