"""Hyper-parameter sweeps: expand a sweep config, train (or print) one run per setting, one table.

    python -m experiments.sweep --config=experiments/configs/sweep_mvkt.py:alpha_beta \
        --workdir=runs/sweep_ab --config.data.dir=SHARDS --config.teacher.runs=TEACHER
    python -m experiments.sweep ... --mode=print > jobs.txt    # one `python -m experiments.train` per line
    python -m experiments.sweep ... --collect                  # only rebuild the table

The sweep config file defines ``get_config(arg)`` and ``get_hyper(hyper[, arg])``
(see ``experiments/hyper.py``). Other ``--config.x=y`` overrides apply to every run.
Each run lives in ``<workdir>/runs/<config_hash>`` (``mvkt.run_dir.config_hash`` of its
full config) with an ``overrides.json`` naming its swept values, so re-running
skips finished runs and a changed config gets a new folder. ``--mode=local``
trains the runs one after the other in this process and evaluates each once on
the test split; ``--mode=print`` prints the training commands for a scheduler.
``<workdir>/sweep.md`` + ``sweep.json`` list every run, sorted by the validation
macro-AUC of its best checkpoint: the validation split selects, the test numbers
are reported for the record only.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import inspect
import json
import pathlib
import shlex
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import hyper
from experiments import study
from experiments import cli
from mvkt import distributed
from mvkt import run_config
from mvkt import run_dir
from mvkt import step as step_lib
from mvkt import train as train_lib

OVERRIDES_FILE = "overrides.json"
ERROR_FILE = "error.json"
# Paths are made absolute so that hashes and printed commands do not depend on the cwd.
PATH_FIELDS = ("data.dir", "teacher.runs")  # teacher.runs may list an ensemble


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One setting of a sweep: its swept values, full config and folder key."""

    overrides: dict[str, Any]          # {"config.alpha": 0.5, ...}: only the swept values
    config: ml_collections.ConfigDict  # the full resolved config
    config_hash: str

    def workdir(self, sweep_dir: pathlib.Path) -> pathlib.Path:
        return pathlib.Path(sweep_dir) / "runs" / self.config_hash


# ----------------------------------------------------------------------------- expansion

def load_sweep_file(config_spec: str) -> tuple[Any, str | None]:
    """``path/to/sweep.py[:arg]`` -> (the loaded module, arg)."""
    path, _, arg = config_spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sweep config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_config", "get_hyper"):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f"{path} defines no {fn}(): a sweep config needs get_config(arg) "
                             "and get_hyper(hyper)")
    return module, (arg or None)


def _absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    for name, value in overrides.items():
        if hyper.field_path(name) == "data.dir" and isinstance(value, str) and value:
            out[name] = str(pathlib.Path(value).absolute())
        elif hyper.field_path(name) == "teacher.runs" and value:
            out[name] = tuple(str(pathlib.Path(v).absolute()) for v in run_config.path_list(value))
    return out


def expand(config_spec: str, *, overrides: dict[str, Any] | None = None) -> list[SweepRun]:
    """The runs of a sweep: ``get_config(arg)`` + ``overrides`` (every run) + each swept setting."""
    module, arg = load_sweep_file(config_spec)
    base = module.get_config(arg)
    overrides = _absolute_paths({hyper.field_path(k): v for k, v in (overrides or {}).items()})
    base = hyper.apply_overrides(base, overrides, source="--config override")
    takes_arg = len(inspect.signature(module.get_hyper).parameters) > 1
    settings = module.get_hyper(hyper, arg) if takes_arg else module.get_hyper(hyper)
    if not settings:
        raise ValueError(f"{config_spec}: get_hyper returned no runs")
    runs, seen = [], {}
    for setting in settings:
        clash = sorted(hyper.field_path(k) for k in setting if hyper.field_path(k) in overrides)
        if clash:
            raise ValueError(f"--config.{clash[0]} is swept by {config_spec}; drop that override")
        setting = _absolute_paths(setting)
        config = hyper.apply_overrides(base, setting, source=config_spec)
        key = run_dir.config_hash(config)
        if key in seen:
            raise ValueError(f"{config_spec}: settings {seen[key]} and {setting} give the same config")
        seen[key] = setting
        runs.append(SweepRun(overrides=dict(setting), config=config, config_hash=key))
    return runs


def write_overrides(runs: list[SweepRun], sweep_dir: pathlib.Path, *, config_spec: str,
                    global_overrides: dict[str, Any]) -> None:
    for run in runs:
        workdir = run.workdir(sweep_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        study.write_json(workdir / OVERRIDES_FILE, {
            "config_spec": config_spec, "config_hash": run.config_hash, "overrides": run.overrides,
            "global_overrides": _absolute_paths({hyper.field_path(k): v for k, v in global_overrides.items()})})


# ----------------------------------------------------------------------------- run state

def run_state(workdir: pathlib.Path) -> dict:
    """Status, best validation macro-AUC and (if evaluated) test macro-AUC of one run folder."""
    workdir = pathlib.Path(workdir)
    rows = run_dir.metric_rows(workdir)
    val_rows = [r for r in rows if r.get("val_macro_auc") is not None]
    # The best checkpoint is the first epoch with the highest validation macro-AUC.
    best = max(val_rows, key=lambda r: r["val_macro_auc"], default=None)
    steps = max((r["step"] for r in rows), default=0)
    info_path = workdir / run_dir.INFO_FILE
    total = run_dir.load_info(workdir)["total_steps"] if info_path.exists() else None
    if (workdir / ERROR_FILE).exists():
        status = "failed"
    elif run_dir.is_finished(workdir):
        status = "finished"
    elif rows or info_path.exists():
        status = f"partial ({steps}/{total} steps)"
    else:
        status = "not started"
    state = {"status": status, "steps": steps, "total_steps": total,
             "val_macro_auc": best["val_macro_auc"] if best else None,
             "best_epoch": best["epoch"] if best else None}
    test_path = workdir / "eval_test.json"
    if status == "finished" and test_path.exists():
        result = json.loads(test_path.read_text())
        state.update(test_macro_auc=result["macro_auc"], test_ci=result["macro_auc_ci"],
                     test_n_resamples=result["n_resamples"])
    if status == "failed":
        state["error"] = json.loads((workdir / ERROR_FILE).read_text())["error"]
    return state


# ----------------------------------------------------------------------------- modes

def validate(runs: list[SweepRun]) -> None:
    """Fail before any training for mistakes that would otherwise stop the sweep halfway."""
    for run in runs:
        config = run.config
        where = f"run {run.overrides}"
        loss_spec = step_lib.LossSpec.from_config(config)
        run_config.trained_leads(config)
        if not (pathlib.Path(config.data.dir) / "manifest.json").exists():
            raise FileNotFoundError(f"{where}: no shards at config.data.dir={config.data.dir!r}; "
                                    "pass --config.data.dir=SHARDS")
        if loss_spec.needs_teacher:
            if not run_config.teacher_runs(config):
                raise ValueError(f"{where}: method {config.method!r} needs a trained teacher: pass "
                                 "--config.teacher.runs=RUN (e.g. python -m experiments.train "
                                 "--config=experiments/configs/teacher.py --workdir=RUN ...)")
            for teacher in run_config.teacher_runs(config):
                if not run_dir.is_finished(pathlib.Path(teacher)):
                    raise FileNotFoundError(f"{where}: teacher {teacher} is not a finished run")


def run_local(runs: list[SweepRun], sweep_dir: pathlib.Path, *, progress: bool = True,
              log: Callable[[str], None] = print) -> None:
    """Trains every unfinished run in sequence and evaluates each once on the test split.

    A run whose loss diverges is recorded in its ``error.json`` and skipped on
    reruns (delete the file to retry); the other runs go on.
    """
    validate(runs)
    for i, run in enumerate(runs, 1):
        workdir = run.workdir(sweep_dir)
        label = f"[{i}/{len(runs)}] {run.config_hash} {_describe(run.overrides)}"
        # The chief decides what to skip: every process must train the same runs.
        if distributed.chief_decides((workdir / ERROR_FILE).exists()):
            log(f"{label}: failed earlier, skipped (delete {workdir / ERROR_FILE} to retry)")
            continue
        if distributed.chief_decides(run_dir.is_finished(workdir)):
            log(f"{label}: finished")
        else:
            log(f"{label}: training")
            try:
                train_lib.train_and_evaluate(run.config, workdir, progress=progress)
            except train_lib.TrainingDivergedError as e:
                study.write_json(workdir / ERROR_FILE, {"error": str(e)})
                log(f"{label}: diverged: {e}")
                continue
            if not distributed.chief_decides(run_dir.is_finished(workdir)):   # stopped by train.stop_at_step
                log(f"{label}: stopped before the last step; rerun to continue")
                return
        study.evaluate_run(workdir, n_resamples=int(run.config.eval.bootstrap_resamples))


def flag_value(value: Any) -> str:
    """A config value as ml_collections' command-line parser reads it back."""
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)   # shortest exact round trip
    raise ValueError(f"cannot pass {value!r} ({type(value).__name__}) as a command-line override")


def flag_args(name: str, value: Any) -> list[str]:
    """``--config.name=value``; a tuple (``teacher.runs``) as the flag repeated once per item,
    which the command line reads back as the same tuple (so the printed run hashes the same)."""
    if isinstance(value, (tuple, list)):
        return [f"--config.{name}={flag_value(v)}" for v in value]
    return [f"--config.{name}={flag_value(value)}"]


def train_commands(runs: list[SweepRun], sweep_dir: pathlib.Path, *, config_spec: str,
                   global_overrides: dict[str, Any], extra_args: Sequence[str] = ()) -> list[str]:
    """One ``python -m experiments.train`` command per run (run from the repository root).

    ``extra_args`` go on every command (the multi-host flags: a scheduler starts each
    command on every host of its job)."""
    global_overrides = _absolute_paths({hyper.field_path(k): v for k, v in global_overrides.items()})
    path, colon, arg = config_spec.partition(":")
    config_spec = str(pathlib.Path(path).absolute()) + colon + arg   # a job may start elsewhere
    commands = []
    for run in runs:
        args = ["python", "-m", "experiments.train", f"--config={config_spec}",
                f"--workdir={run.workdir(sweep_dir).absolute()}"]
        for name, value in [*global_overrides.items(), *run.overrides.items()]:
            args += flag_args(hyper.field_path(name), value)
        commands.append(shlex.join([*args, *extra_args]))
    return commands


# ----------------------------------------------------------------------------- table

def _describe(overrides: dict[str, Any]) -> str:
    return " ".join(f"{hyper.field_path(k)}={v}" for k, v in overrides.items())


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def collect(runs: list[SweepRun], sweep_dir: pathlib.Path, *, config_spec: str,
            global_overrides: dict[str, Any], command: str) -> pathlib.Path:
    """``sweep.md`` + ``sweep.json`` from whatever runs have finished; returns the md path."""
    sweep_dir = pathlib.Path(sweep_dir)
    rows = []
    for run in runs:
        workdir = run.workdir(sweep_dir)
        rows.append({"config_hash": run.config_hash, "workdir": str(workdir.absolute()),
                     "overrides": run.overrides, **run_state(workdir)})
    # Finished runs by validation macro-AUC; a partial run's best-so-far is not comparable.
    def key(row):
        finished = row["status"] == "finished" and row["val_macro_auc"] is not None
        return (not finished, -(row["val_macro_auc"] or 0.0))
    rows.sort(key=key)
    columns = list(dict.fromkeys(hyper.field_path(k) for run in runs for k in run.overrides))
    lines = [f"# Sweep `{config_spec}`", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by:", "",
             f"```\n{command}\n```", ""]
    first = next((pathlib.Path(r["workdir"]) for r in rows
                  if (pathlib.Path(r["workdir"]) / run_dir.INFO_FILE).exists()), None)
    if first is not None:
        from experiments import report as report_lib
        lines += ["## Data", report_lib.data_section(first)[0], ""]
    finished = [r for r in rows if r["status"] == "finished"]
    lines += ["## Runs", "",
              f"{len(finished)} of {len(rows)} runs finished. Sorted by the validation macro-AUC of "
              "each run's best checkpoint (the checkpoint is also chosen on validation): **select "
              "settings by the validation column**; test macro-AUC (95% bootstrap CI over test "
              "records) is for reporting the selected setting, never for choosing it.", ""]
    if global_overrides:
        lines += ["Settings shared by every run: " + ", ".join(
            f"`{hyper.field_path(k)}={v}`" for k, v in global_overrides.items()), ""]
    lines += ["| rank | " + " | ".join(columns) + " | val macro-AUC | best epoch | "
              "test macro-AUC [95% CI] | status | run |",
              "|---|" + "---|" * len(columns) + "---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        values = {hyper.field_path(k): v for k, v in row["overrides"].items()}
        test = ""
        if row.get("test_macro_auc") is not None:
            lo, hi = row["test_ci"]
            test = f"{row['test_macro_auc']:.4f} [{lo:.4f}, {hi:.4f}]"
        rank_cell = str(rank) if row["status"] == "finished" and row["val_macro_auc"] is not None else ""
        status = row["status"] + (f": {row['error'][:80]}" if row.get("error") else "")
        best_epoch = "" if row["best_epoch"] is None else f"{row['best_epoch']:g}"
        lines.append(f"| {rank_cell} | " + " | ".join(str(values.get(c, "")) for c in columns) +
                     f" | {_fmt(row['val_macro_auc'])} | {best_epoch} | {test} | {status} | "
                     f"`{study.relative(pathlib.Path(row['workdir']), sweep_dir)}` |")
    path = sweep_dir / "sweep.md"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    study.write_json(sweep_dir / "sweep.json", {
        "config_spec": config_spec, "command": command,
        "global_overrides": _absolute_paths({hyper.field_path(k): v for k, v in global_overrides.items()}),
        "selection": "validation macro-AUC of the best checkpoint", "rows": rows})
    return path


# ----------------------------------------------------------------------------- entry point

def run_sweep(*, config_spec: str, workdir: str | pathlib.Path, overrides: dict[str, Any] | None = None,
              mode: str = "local", collect_only: bool = False, progress: bool = True,
              command: str = "", log: Callable[[str], None] = print,
              extra_args: Sequence[str] = ()) -> dict:
    """Expands the sweep and runs ``mode`` (local | print), then collects the table.

    Returns ``{"runs": [SweepRun], "commands": [str] (print mode), "table": md path or None}``;
    print mode only prints (writes no table), so its stdout stays one command per line;
    ``extra_args`` are added to every printed command.
    """
    if mode not in ("local", "print"):
        raise ValueError(f"mode must be local or print, not {mode!r}")
    sweep_dir = pathlib.Path(workdir).absolute()
    overrides = _absolute_paths({hyper.field_path(k): v for k, v in (overrides or {}).items()})
    runs = expand(config_spec, overrides=overrides)
    if not collect_only:  # printed jobs must not fail one by one on a missing data dir or teacher
        validate(runs)
    distributed.on_chief(write_overrides, runs, sweep_dir, config_spec=config_spec, global_overrides=overrides)
    result = {"runs": runs, "commands": [], "table": None}
    if mode == "print" and not collect_only:
        result["commands"] = train_commands(runs, sweep_dir, config_spec=config_spec,
                                            global_overrides=overrides, extra_args=extra_args)
        return result
    if not collect_only:
        run_local(runs, sweep_dir, progress=progress, log=log)
    result["table"] = distributed.on_chief(
        collect, runs, sweep_dir, config_spec=config_spec, global_overrides=overrides,
        command=command or f"experiments.sweep.run_sweep(config_spec={config_spec!r})")
    return result


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (importing never clashes)."""
    config_flags.DEFINE_config_file(
        "config", None, "sweep config file[:sweep name] defining get_config and get_hyper",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "sweep folder (runs/<config_hash>, sweep.md)", required=True)
    flags.DEFINE_enum("mode", "local", ["local", "print"],
                      "local: train and evaluate here in sequence; print: one training command per run")
    flags.DEFINE_bool("collect", False, "only rebuild sweep.md/sweep.json from finished runs")


def main(argv):
    del argv
    f = flags.FLAGS
    if f["config"].value is None:
        print("error: --config=experiments/configs/sweep_<name>.py[:sweep] is required", file=sys.stderr)
        sys.exit(1)
    config_spec = config_flags.get_config_filename(f["config"])
    overrides = config_flags.get_override_values(f["config"])
    # Progress goes to stderr in print mode: stdout is the list of commands.
    log = (lambda m: print(m, file=sys.stderr)) if f.mode == "print" else print
    with cli.exit_on_known_errors():
        if f.mode == "print":
            # Printing starts no job: the multi-host flags go into the printed commands instead.
            cli.quiet_library_logs()
        else:
            cli.start()
        result = run_sweep(config_spec=config_spec, workdir=f.workdir, overrides=overrides,
                           mode=f.mode, collect_only=f.collect, log=log, extra_args=cli.multi_host_args(),
                           command=" ".join(["python -m experiments.sweep", *map(shlex.quote, sys.argv[1:])]))
    if result["commands"]:
        print("\n".join(result["commands"]))
        print(f"{len(result['commands'])} runs under {pathlib.Path(f.workdir).absolute() / 'runs'}; "
              "afterwards: the same command with --collect (or --mode=local to evaluate on test)",
              file=sys.stderr)
    elif distributed.is_chief():
        print(result["table"].read_text())
        print(f"table: {result['table']}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
