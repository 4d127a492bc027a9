"""Whole training runs: where their wall time goes, against the isolated step rate.

    python -m benchmarks.end_to_end [--subset=../shared/datasets/ptbxl-subset-1819]
        [--workloads=subset_teacher,...] [--work=/tmp/mvkt_end_to_end]

Each workload is a real ``python -m experiments.train`` job in a subprocess. Its wall time is
split with the run's own ``timings.json`` (``mvkt.timing``): start-up (imports, device init,
flag parsing: the subprocess's wall time outside ``train_and_evaluate``), shard verification,
the rest of the setup (splits, loader, teacher, state), compilation (the first call of the
step), input (waiting for prefetched batches), steps (dispatching them and waiting for their
results), logging, validation and checkpointing. Samples/s are given for the whole job
(steps x batch / job wall time) and for the training loop alone (input + dispatch + device
wait + logging),
against ``benchmarks/train_step.py``'s isolated step rate of the same net, batch and crop,
measured by this run on this machine, in this run.

``*_trivial`` workloads replace the jitted step by one that only advances the step counter
(and reads one sample of the batch, so the transfer or the on-device crop still happens;
``*_trivial_noop_*`` not even that, so no device work is left).
"host us/step" is (input + dispatch + logging) / steps: the host's time per step that the
devices cannot overlap. On XLA:CPU a call runs its program before the host goes on, so there
the no-op row is host work alone and the other trivial rows an upper bound of it.

Workloads: ``subset_teacher`` (the default 12-lead teacher, 20 epochs, on ptbxl-subset-1819)
with the training data on the devices (the default) and on the host loader, with 10
steps per dispatch, and validating every 5 epochs; ``subset_student`` (the MVKT memory-bank
student of that teacher); ``tiled_teacher`` (the subset tiled to full PTB-XL size, 21,837
records, for throughput only: its records repeat), also for 5 epochs validating once; the
host cost per step of the tiled teacher on both input paths; and ``paper_teacher`` (the
official recipe, experiments/configs/paper.py, a few steps: its step time projects the 10-fold
study). Writes benchmarks/results/end_to_end.json and prints a table; every row carries the
load average at its start and end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.data_prep import tile_ptbxl  # noqa: E402

FULL_PTBXL_RECORDS = 21_837
TRIVIAL_FLAG = "--trivial_step_worker"
NOOP_FLAG = "--noop"  # after TRIVIAL_FLAG: the step does not read its batch either


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    config: str  # experiments/configs/<config>.py
    data: str  # "subset" | "tiled"
    overrides: tuple[str, ...] = ()
    trivial: bool = False
    noop: bool = False  # trivial, and the batch is not read: no device work, host work alone
    teacher: str | None = None  # workload whose run is this student's teacher
    isolated: tuple[str, str] | None = ("resnet1d_wang", "teacher_bce")  # train_step.py row to compare with
    note: str = ""


def workloads(epochs: int, student_epochs: int, tiled_epochs: int, paper_steps: int) -> list[Workload]:
    quick_eval = ("--config.eval.every_epochs=1000",)  # trivial rows: validation only at the end
    return [
        Workload("subset_teacher", "teacher", "subset", (f"--config.train.epochs={epochs}",),
                 note="default teacher, data on the devices"),
        Workload("subset_teacher_host", "teacher", "subset",
                 (f"--config.train.epochs={epochs}", "--config.train.device_data_gb=0"), note="host loader"),
        Workload("subset_teacher_k10", "teacher", "subset",
                 (f"--config.train.epochs={epochs}", "--config.train.steps_per_dispatch=10"),
                 note="10 steps per dispatch"),
        Workload("subset_teacher_eval5", "teacher", "subset",
                 (f"--config.train.epochs={epochs}", "--config.eval.every_epochs=5"),
                 note="validation every 5 epochs"),
        Workload("subset_student", "student", "subset",
                 (f"--config.train.epochs={student_epochs}", "--config.method=mvkt",
                  "--config.clt.variant=memory_bank"), teacher="subset_teacher",
                 isolated=("resnet1d_wang", "mvkt_memory_bank"), note="MVKT memory-bank student, lead I"),
        Workload("tiled_teacher", "teacher", "tiled", (f"--config.train.epochs={tiled_epochs}",),
                 note="full PTB-XL size (tiled: throughput only)"),
        Workload("tiled_teacher_eval5", "teacher", "tiled", ("--config.train.epochs=5", "--config.eval.every_epochs=5"),
                 note="full PTB-XL size, 5 epochs, validation every 5 epochs"),
        Workload("tiled_teacher_trivial_host", "teacher", "tiled",
                 (f"--config.train.epochs={tiled_epochs}", "--config.train.device_data_gb=0", *quick_eval),
                 trivial=True, isolated=None, note="host cost per step: host loader, K=1"),
        Workload("tiled_teacher_trivial_device", "teacher", "tiled",
                 (f"--config.train.epochs={tiled_epochs}", *quick_eval), trivial=True, isolated=None,
                 note="host cost per step: data on the devices, K=1"),
        Workload("tiled_teacher_trivial_device_k10", "teacher", "tiled",
                 (f"--config.train.epochs={tiled_epochs}", "--config.train.steps_per_dispatch=10",
                  "--config.train.log_every_steps=50", *quick_eval), trivial=True, isolated=None,
                 note="host cost per step: data on the devices, K=10, log every 50"),
        Workload("tiled_teacher_trivial_noop_device_k10", "teacher", "tiled",
                 (f"--config.train.epochs={tiled_epochs}", "--config.train.steps_per_dispatch=10",
                  "--config.train.log_every_steps=50", *quick_eval), trivial=True, noop=True, isolated=None,
                 note="host work per step alone: as the K=10 row, but the step reads no batch, so no crop runs"),
        Workload("paper_teacher", "paper", "subset", (f"--config.train.stop_at_step={paper_steps}",),
                 isolated=None, note=f"official recipe, first {paper_steps} steps (xresnet1d101, batch 32, 10 s)"),
    ]


def trivial_worker(argv: list[str]) -> None:
    """``experiments.train`` with the step replaced by one that does (almost) nothing: it reads
    one sample of its batch, so the batch (or its crop on the devices) is still made, unless
    ``argv`` starts with NOOP_FLAG. On XLA:CPU a call also runs its program before the host
    goes on, so only the no-op step's calls are host work alone there; the other trivial rows
    bound the host work from above."""
    noop = bool(argv) and argv[0] == NOOP_FLAG
    argv = argv[1:] if noop else argv
    import jax
    import jax.numpy as jnp

    from experiments import cli
    from experiments import train as train_entry
    from mvkt import step as step_lib

    original = step_lib.build_training

    def build_trivial(*args, **kwargs):
        training = original(*args, **kwargs)

        def trivial(state, batch, rng):
            # The batch (or its on-device crop) is still made, unless noop: then XLA drops the crop.
            touched = state.step * 0.0 if noop else batch["x"][0, 0, 0] * 0.0
            metrics = {"loss": touched, "loss_bce": touched, "grad_norm": touched, "learning_rate": touched}
            return state.replace(step=state.step + 1), metrics

        return dataclasses.replace(training, update=jax.jit(trivial, donate_argnums=(0,)), update_fn=trivial)

    step_lib.build_training = build_trivial
    del jnp
    train_entry.define_flags()
    app.run(train_entry.main, argv=[sys.argv[0], *argv], flags_parser=cli.parse_flags)


def _shards(args, kind: str) -> pathlib.Path:
    from data_prep import ptbxl

    work = pathlib.Path(args.work)
    src = pathlib.Path(args.subset).resolve()
    if kind == "tiled":
        src = tile_ptbxl(src, work / "tiled_source", FULL_PTBXL_RECORDS)
    out = work / f"shards_{kind}"
    if not (out / "manifest.json").is_file():
        ptbxl.prepare(src, out, overwrite=True)
    return out


def _run(args, workload: Workload, shards: pathlib.Path, runs: dict) -> dict:
    workdir = pathlib.Path(args.work) / "runs" / workload.name
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "benchmarks.end_to_end", TRIVIAL_FLAG] if workload.trivial else [
        sys.executable, "-m", "experiments.train"]
    command += [NOOP_FLAG] if workload.noop else []
    command += [f"--config=experiments/configs/{workload.config}.py", f"--workdir={workdir}",
                f"--config.data.dir={shards}", *workload.overrides]
    if workload.teacher:
        command.append(f"--config.teacher.runs={runs[workload.teacher]['workdir']}")
    harness.wait_for_quiet(args.settle_s)
    load_start = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{workload.name} failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    timings = json.loads((workdir / "timings.json").read_text())
    info = json.loads((workdir / "run_info.json").read_text())
    phases = timings["phases_s"]
    steps = timings["end_step"] - timings["start_step"]
    batch = timings["batch_size"]
    host = phases.get("input", 0) + phases.get("dispatch", 0) + phases.get("logging", 0)
    loop = host + phases.get("device_wait", 0)
    row = {"workload": workload.name, "note": workload.note, "trivial": workload.trivial, "noop": workload.noop,
           "command": " ".join(command[1:]), "workdir": str(workdir), "steps": steps, "batch_size": batch,
           "steps_per_epoch": info["steps_per_epoch"], "training_data": timings["training_data"],
           "steps_per_dispatch": timings["steps_per_dispatch"], "job_wall_s": wall,
           "startup_s": wall - timings["wall_s"], "phases_s": phases, "other_s": timings["other_s"],
           "loop_s": loop, "host_s_per_step": host / steps, "job_samples_per_s": steps * batch / wall,
           "loop_samples_per_s": steps * batch / loop,
           "load_average_start": load_start[0], "load_average_end": os.getloadavg()[0]}
    row["busy"] = max(row["load_average_start"], 0.0) > harness.busy_load()
    return row


def _isolated_rates(args, pairs: set[tuple[str, str]]) -> dict:
    """benchmarks/train_step.py's JAX rows for these (arch, config), measured now."""
    rates = {}
    for arch in sorted({a for a, _ in pairs}):
        configs = sorted(c for a, c in pairs if a == arch)
        out = pathlib.Path(args.work) / f"train_step_{arch}.json"
        command = [sys.executable, "-m", "benchmarks.train_step", f"--archs={arch}", f"--configs={','.join(configs)}",
                   "--no_torch", f"--out={out}", f"--settle_s={args.settle_s}", "--batch_size=128", "--crop=250"]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=args.timeout_s)
        for row in json.loads(out.read_text())["rows"]:
            rates[(row["arch"], row["config"])] = {"samples_per_s": row["jax"]["samples_per_s"],
                                                   "median_step_s": row["jax"]["median_step_s"],
                                                   "load_average_start": row["load_average_start"][0]}
    return rates


def table(rows: list[dict]) -> str:
    phases = ("verify_shards", "device_data", "compile", "input", "dispatch", "device_wait", "logging", "validation",
              "checkpointing")
    head = ["workload", "steps", "job s", "start-up", "setup"] + [p.replace("_", " ") for p in phases] + [
        "ckpt wait", "other", "job smp/s", "loop smp/s", "isolated smp/s", "job/iso", "loop/iso",
        "host us/step", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["phases_s"]
        iso = r.get("isolated_samples_per_s")
        setup = p.get("setup", 0.0) - p.get("verify_shards", 0.0) - p.get("device_data", 0.0)
        cells = [r["workload"], str(r["steps"]), f"{r['job_wall_s']:.1f}", f"{r['startup_s']:.1f}", f"{setup:.1f}"]
        cells += [f"{p.get(k, 0.0):.2f}" for k in phases]
        cells += [f"{p.get('checkpoint_wait', 0.0):.2f}", f"{r['other_s']:.2f}", f"{r['job_samples_per_s']:.0f}",
                  f"{r['loop_samples_per_s']:.0f}", f"{iso:.0f}" if iso else "-",
                  f"{r['job_samples_per_s'] / iso:.2f}" if iso else "-",
                  f"{r['loop_samples_per_s'] / iso:.2f}" if iso else "-",
                  # Only the trivial step's calls are host work alone: on XLA:CPU a real call
                  # computes part of its step before it returns.
                  f"{r['host_s_per_step'] * 1e6:.0f}" if r["trivial"] else "-",
                  f"{r['load_average_start']:.2f}/{r['load_average_end']:.2f}" + (" BUSY" if r["busy"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("subset", "../shared/datasets/ptbxl-subset-1819", "PTB-XL folder (release layout)")
    flags.DEFINE_string("work", "/tmp/mvkt_end_to_end", "shards, tiled source and run folders")
    flags.DEFINE_list("workloads", [], "subset of the workloads (default all); see the module docstring")
    flags.DEFINE_integer("epochs", 20, "epochs of the subset teacher workloads")
    flags.DEFINE_integer("student_epochs", 10, "epochs of the subset student")
    flags.DEFINE_integer("tiled_epochs", 2, "epochs of the tiled (full PTB-XL size) workloads")
    flags.DEFINE_integer("paper_steps", 12, "steps of the official recipe measured")
    flags.DEFINE_float("settle_s", 90.0, "longest wait for a quiet machine before each row")
    flags.DEFINE_integer("timeout_s", 3600, "hard limit of each subprocess")
    flags.DEFINE_string("out", "benchmarks/results/end_to_end.json", "JSON results")


def main(argv) -> int:
    del argv
    args = harness.flag_values()
    chosen = workloads(args.epochs, args.student_epochs, args.tiled_epochs, args.paper_steps)
    if args.workloads:
        unknown = sorted(set(args.workloads) - {w.name for w in chosen})
        if unknown:
            raise SystemExit(f"--workloads: unknown {unknown}; known: {[w.name for w in chosen]}")
        needed = set(args.workloads) | {w.teacher for w in chosen if w.name in args.workloads and w.teacher}
        chosen = [w for w in chosen if w.name in needed]
    started = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], markdown: str | None) -> None:
        # Rewritten after every row, so that a run cut short (a time limit on a lent GPU) keeps its rows.
        result = {"command": "python -m benchmarks.end_to_end " + " ".join(sys.argv[1:]),
                  "environment": harness.environment(), "busy_load": harness.busy_load(), "rows": rows,
                  "complete": markdown is not None, "markdown": markdown,
                  "total_seconds": time.perf_counter() - started}
        out.write_text(json.dumps(result, indent=2) + "\n")

    rates = _isolated_rates(args, {w.isolated for w in chosen if w.isolated})
    runs: dict[str, dict] = {}
    for workload in chosen:
        row = _run(args, workload, _shards(args, workload.data), runs)
        if workload.isolated:
            iso = rates[workload.isolated]
            row["isolated"] = {"arch": workload.isolated[0], "config": workload.isolated[1], **iso}
            row["isolated_samples_per_s"] = iso["samples_per_s"]
        runs[workload.name] = row
        print(f"{workload.name}: {row['job_wall_s']:.1f} s, loop {row['loop_samples_per_s']:.0f} samples/s, "
              f"load {row['load_average_start']:.2f}", flush=True)
        write(list(runs.values()), None)
    markdown = table(list(runs.values()))
    print("\n" + markdown)
    write(list(runs.values()), markdown)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == TRIVIAL_FLAG:
        trivial_worker(sys.argv[2:])
    else:
        harness.define_flags(define_flags)
        app.run(main)
