"""Train-step benchmark: mvkt's jitted JAX step vs. a PyTorch eager reference.

What is timed
-------------
For each architecture (`--archs`, default resnet1d_wang and xresnet1d50) and each
configuration below, one optimisation step on a batch of `--batch_size` 12-lead crops
of `--crop` samples with 5 classes:

| config | JAX (mvkt) | PyTorch reference |
|---|---|---|
| `teacher_bce` | method `bce`, 12 leads | 12-lead net, BCE |
| `student_bce` | method `bce`, lead I | lead-I net, BCE |
| `mvkt_memory_bank` | method `mvkt`, CLT `memory_bank` (K=1024 negatives, N=1442 records), teacher forward in the step | same, CRD memory + momentum update |
| `mvkt_memory_bank_cache` | as above, batch carries `teacher_logits`/`teacher_features` (teacher forward skipped) | same |
| `mvkt_in_batch` | method `mvkt`, CLT `in_batch`, teacher forward in the step | same, in-batch InfoNCE |
| `mvkt_in_batch_cache` | as above with the teacher cache | same |

The JAX side is exactly what `mvkt.train.train_and_evaluate` runs: the state and the
donated, jitted step from `mvkt.step.build_training` (lowered and compiled ahead of time so that compilation is timed separately; the
executable is the one `jit` builds), batches placed with `Parallelism.to_global`, the
optimizer from `make_optimizer` (clip by global norm + AdamW, one-cycle schedule) and
the losses of `mvkt.losses` with the defaults of `experiments/configs/default.py`.
Data loading is not timed (training prefetches batches in a background thread).

The PyTorch reference (eager, CPU; `benchmarks/torch_reference.py`) is a port of the same nets (same layers, widths,
kernels, paddings; parameter shapes are checked against the Flax nets before timing),
the same losses (BCE, tempered binary-KL MKD, symmetric disease-aware in-batch InfoNCE,
CRD memory-bank NCE with disease-aware negative sampling and momentum update) and
AdamW + gradient clipping + one-cycle LR, channels-first `(B, L, T)`,
`torch.set_num_threads(<cores>)`.

Method
------
Every (arch, config) gets two fresh worker processes, one JAX, one PyTorch, so that
each process's peak RSS belongs to that configuration only. Both are set up and warmed
up (JAX: lower + compile, reported as "compile s", then `--warmup` steps), then the
coordinator alternates timing rounds between them (JAX first on even rounds, PyTorch
first on odd ones; only one worker computes at a time). A round runs `--steps` steps and
blocks on the result; the step time of a framework is the median over `--repeats`
rounds of (round time / steps); samples/s = batch / median step time.

Peak memory: on CPU, the peak resident set size (VmHWM) of the worker process during
the timed rounds minus its RSS after imports and backend start, before any model or
data existed; the kernel's peak counter is reset (`/proc/self/clear_refs` = 5) after
warm-up so compilation transients are excluded (the JSON also has the peak including
compilation). Before that reset the JAX worker returns the heap that compilation freed to the
OS (glibc ``malloc_trim``), as ``mvkt.train`` does after its first steps; without it glibc
keeps that heap mapped and it counts as resident for the whole run. Same method for both
frameworks (tracemalloc would miss the native allocations of both). Where JAX's device reports memory statistics (GPU), the JAX
column is `memory_stats()["peak_bytes_in_use"]` instead; the JSON says which.

Usage
-----
    pip install torch==2.13.0       # benchmark-only dependency (CPU wheel), not used by mvkt
    python benchmarks/train_step.py                      # full run, both archs
    python benchmarks/train_step.py --quick              # smoke check (tiny, ~1-2 min)
    python benchmarks/train_step.py --configs=mvkt_memory_bank --num_records=17400  # full PTB-XL's bank
    python benchmarks/train_step.py --no_torch --notrim  # the JAX step without mvkt.train's heap trim

Without torch the JAX columns are still measured and the torch columns say why they
are empty. `--jax_env XLA_FLAGS=...` passes environment variables to the JAX workers only
(for flag experiments; recorded in the JSON).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks import torch_reference  # noqa: E402

ARCHS = ("resnet1d_wang", "xresnet1d50")

TORCH_INSTALL = "pip install torch==2.13.0"



def jax_worker(args) -> None:
    import jax
    import numpy as np

    from mvkt import memory

    device = jax.devices()[0]
    baseline_mb = harness.rss_mb()
    built = harness.build_step(args.arch, args.config, batch_size=args.batch_size, crop=args.crop,
                               num_batches=args.num_batches, total_steps=args.total_steps, precision=args.precision,
                               num_records=args.num_records)
    training, teacher, batches, base_rng = built["training"], built["teacher"], built["batches"], built["rng"]
    state, update = training.state, training.update

    rss_before_compile_mb = harness.rss_mb() - baseline_mb
    t0 = time.perf_counter()
    lowered = update.lower(state, batches[0], base_rng)
    t1 = time.perf_counter()
    step = lowered.compile()
    t2 = time.perf_counter()
    rss_after_compile_mb = harness.rss_mb() - baseline_mb
    flops = harness.step_flops(lowered, step)
    xla_memory = None
    try:  # XLA's own buffer accounting of the step executable
        ma = step.memory_analysis()
        xla_memory = {k: getattr(ma, k) / 2**20 for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass

    holder = {"state": state, "i": 0}
    del state

    def run_steps(n: int) -> float:
        if n <= 0:
            return 0.0
        s = holder["state"]
        metrics = None
        start = time.perf_counter()
        for _ in range(n):
            s, metrics = step(s, batches[holder["i"] % len(batches)], base_rng)
            holder["i"] += 1
        jax.block_until_ready((s, metrics))
        elapsed = time.perf_counter() - start
        holder["state"], holder["metrics"] = s, metrics
        return elapsed

    first_step_s = run_steps(1)
    run_steps(max(args.warmup - 1, 0))
    metrics = {k: float(v) for k, v in jax.device_get(holder["metrics"]).items()}
    peak_with_compile_mb = harness.hwm_mb() - baseline_mb
    if args.trim:
        memory.release_freed_memory()  # as mvkt.train does after its first steps
    held_before_steps_mb = harness.rss_mb() - baseline_mb
    peak_reset = harness.reset_peak()

    params = holder["state"].params
    n_model = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["model"]))
    n_heads = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["heads"]))
    n_teacher = (sum(int(np.prod(a.shape)) for a in jax.tree.leaves(teacher[1]["params"]))
                 if teacher is not None else 0)
    harness.emit({"event": "ready", "trace_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": first_step_s,
          "warmup_metrics": metrics, "params": {"model": n_model, "heads": n_heads, "teacher": n_teacher},
          "device": device.device_kind, "platform": device.platform, "num_devices": jax.device_count(),
          "xla_memory_mb": xla_memory,
          "flops_per_step": flops,
          "rss_before_compile_mb": rss_before_compile_mb, "rss_after_compile_mb": rss_after_compile_mb})

    def finish() -> dict:
        stats = device.memory_stats()
        out = {"peak_with_compile_mb": peak_with_compile_mb, "baseline_rss_mb": baseline_mb,
               "held_before_steps_mb": held_before_steps_mb,
               "final_loss": float(jax.device_get(holder["metrics"]["loss"]))}
        if stats and "peak_bytes_in_use" in stats:
            out["peak_mb"] = stats["peak_bytes_in_use"] / 2**20
            out["peak_method"] = "jax.devices()[0].memory_stats()['peak_bytes_in_use'] (device memory, whole process)"
        else:
            out["peak_mb"] = harness.hwm_mb() - baseline_mb
            out["peak_method"] = ("process peak RSS (VmHWM) during timed steps minus RSS after imports"
                                  if peak_reset else "process peak RSS (incl. compilation) minus RSS after imports")
        return out

    harness.serve(run_steps, finish)


def params_worker(args) -> None:
    """Flax vs. PyTorch parameter counts and shapes (PyTorch layout) of each arch, 12-lead and lead-I."""
    import jax
    import jax.numpy as jnp

    from mvkt import models

    out = {}
    for arch in args.archs.split(","):
        for leads in (harness.NUM_LEADS, 1):
            variables = jax.eval_shape(
                lambda: models.create_model(arch, num_classes=harness.NUM_CLASSES).init(
                    jax.random.PRNGKey(0), jnp.zeros((1, args.crop, leads)), train=False))
            flax_shapes = harness.flax_param_shapes(variables["params"])
            entry = {"flax": sum(math.prod(s) for s in flax_shapes)}
            try:
                net = torch_reference.build_torch_model(arch, leads, harness.NUM_CLASSES)
                torch_shapes = torch_reference.torch_param_shapes(net)
                entry["torch"] = sum(math.prod(s) for s in torch_shapes)
                entry["shapes_match"] = torch_shapes == flax_shapes
            except ImportError:
                pass
            out[f"{arch}/{leads}-lead"] = entry
    harness.emit({"event": "params", "counts": out})


def _worker_args(args, arch: str, config: str) -> list[str]:
    return [f"--worker_arch={arch}", f"--worker_config={config}", f"--batch_size={args.batch_size}",
            f"--crop={args.crop}", f"--warmup={args.warmup}", f"--num_batches={args.num_batches}",
            f"--total_steps={args.total_steps}", f"--torch_device={args.torch_device}", f"--precision={args.precision}",
            f"--num_records={args.num_records}", f"--trim={args.trim}"]


def bench_config(args, arch: str, config: str, have_torch: bool, jax_env: dict,
                 matmul_gflops: float | None = None) -> dict:
    harness.wait_for_quiet(args.settle_s)
    row: dict = {"arch": arch, "config": config, "precision": args.precision,
                 "load_average_start": os.getloadavg()}
    started, machine0, own0 = time.perf_counter(), harness.machine_busy_seconds(), harness.own_cpu_seconds()
    jw = harness.Worker("jax", __file__, _worker_args(args, arch, config), env=jax_env)
    tw = None
    try:
        ready = jw.read()
        row["jax"] = {k: ready[k] for k in ("trace_s", "compile_s", "first_step_s", "warmup_metrics", "params",
                                            "xla_memory_mb", "rss_before_compile_mb", "rss_after_compile_mb",
                                            "flops_per_step")}
        row["device"], row["platform"], row["num_devices"] = ready["device"], ready["platform"], ready["num_devices"]
        if have_torch:
            tw = harness.Worker("torch", __file__, _worker_args(args, arch, config))
            tready = tw.read()
            row["torch"] = {k: tready[k] for k in ("first_step_s", "warmup_loss", "params", "threads",
                                                   "torch_device", "tf32")}
        jt, tt = [], []
        for r in range(args.repeats):
            order = [(jw, jt), (tw, tt)] if r % 2 == 0 else [(tw, tt), (jw, jt)]
            for w, times in order:
                if w is None:
                    continue
                time.sleep(0.2)  # let the other framework's worker threads go idle
                w.send(f"run {args.steps}")
                times.append(w.read()["seconds"] / args.steps)
        for w, times, key in ((jw, jt, "jax"), (tw, tt, "torch")):
            if w is None:
                continue
            w.send("done")
            row[key].update(w.read())
            med = statistics.median(times)
            row[key].update({"step_times_s": times, "median_step_s": med, "samples_per_s": args.batch_size / med})
            w.proc.wait(timeout=60)
        if tw is not None:
            row["ratio"] = row["jax"]["samples_per_s"] / row["torch"]["samples_per_s"]
            # Robustness check against load drift: median of the ratios of adjacent rounds.
            row["paired_ratio_median"] = statistics.median(t / j for j, t in zip(jt, tt))
            row["params_match"] = row["jax"]["params"] == row["torch"]["params"]
        row["load_average_end"] = os.getloadavg()
        # The benchmark's own two busy cores lift the load towards 2 during a row, so the load at the
        # row's start is the load test; during the row, the CPU time of every other process is.
        others = harness.machine_busy_seconds() - machine0 - (harness.own_cpu_seconds() - own0)
        row["other_processes_cpu_cores"] = max(0.0, others / (time.perf_counter() - started))
        row["busy"] = (row["load_average_start"][0] > harness.busy_load()
                       or row["other_processes_cpu_cores"] > harness.BUSY_OTHER_CORES)
        flops = row["jax"].get("flops_per_step")
        if flops:
            row["jax"]["gflop_per_s"] = flops / row["jax"]["median_step_s"] / 1e9
            if matmul_gflops:
                row["jax"]["share_of_peak"] = row["jax"]["gflop_per_s"] / matmul_gflops
                if tw is not None:  # the same FLOPs in the torch step's time
                    row["torch"]["share_of_peak"] = flops / row["torch"]["median_step_s"] / 1e9 / matmul_gflops
    finally:
        jw.close()
        if tw is not None:
            tw.close()
    return row


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def speed_table(rows: list[dict], torch_skipped: str | None, matmul_gflops: float | None = None,
                   matmul_n: int = 2048) -> str:
    lines = ["| config | JAX samples/s | torch samples/s | ratio | JAX share of peak | torch share of peak | "
             "JAX peak MB | torch peak MB | compile s | load before -> after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = f"{r['arch']} {r['config']}"
        if r.get("precision", "float32") != "float32":
            label += f" ({r['precision']})"
        if r.get("platform", "cpu") != "cpu":
            label += f" [{r['device']}]"
        t = r.get("torch") or {}
        load = f"{r['load_average_start'][0]:.2f} -> {r['load_average_end'][0]:.2f}"
        if "other_processes_cpu_cores" in r:
            load += f", others {r['other_processes_cpu_cores']:.2f} cores"
        load += " BUSY" if r.get("busy") else ""
        lines.append(
            f"| {label} | {r['jax']['samples_per_s']:.1f} | {_fmt(t.get('samples_per_s'), '.1f')} | "
            f"{_fmt(r.get('ratio'), '.2f')} | {_fmt(r['jax'].get('share_of_peak'), '.0%')} | "
            f"{_fmt(t.get('share_of_peak'), '.0%')} | {r['jax']['peak_mb']:.0f} | {_fmt(t.get('peak_mb'), '.0f')} | "
            f"{r['jax']['trace_s'] + r['jax']['compile_s']:.1f} | {load} |")
    if matmul_gflops:
        lines.append(f"\nShare of peak: the step's XLA-counted FLOPs per second over this machine's measured "
                     f"float32 matrix-multiply rate ({matmul_gflops:.0f} GFLOP/s, jitted {matmul_n}x{matmul_n} matmul"
                     f"{'' if matmul_n == 2048 else ', XLA default precision (TF32 on GPU)'}).")
    if any(r.get("busy") for r in rows):
        lines.append(f"\nBUSY rows started at a 1-minute load average above {harness.busy_load():g} or other processes used more "
                     f"than {harness.BUSY_OTHER_CORES} cores during them: do not publish them.")
    if torch_skipped:
        lines.append(f"\ntorch columns empty: PyTorch reference skipped ({torch_skipped}).")
    return "\n".join(lines)


def matmul_worker(args) -> None:
    """This machine's float32 matrix-multiply rate through XLA (the yardstick of "share of peak")."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.devices()[0].platform == "cpu" else 8192  # big enough to reach a GPU's rate
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(5):
            out = f(a)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / 5)
    harness.emit({"event": "matmul", "gflops": 2 * n**3 / statistics.median(times) / 1e9, "n": n})


def define_flags() -> None:
    flags.DEFINE_list("archs", list(ARCHS), "mvkt.models architectures")
    flags.DEFINE_list("configs", list(harness.CONFIGS), f"subset of {', '.join(harness.CONFIGS)}")
    flags.DEFINE_integer("steps", 1, "steps per timing round")
    flags.DEFINE_integer("repeats", 7, "timing rounds per framework (median reported)")
    flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
    flags.DEFINE_integer("batch_size", 128, "global batch")
    flags.DEFINE_integer("crop", 250, "crop length in samples (2.5 s at 100 Hz)")
    flags.DEFINE_integer("num_batches", 4, "distinct synthetic batches cycled through")
    flags.DEFINE_integer("total_steps", 10_000, "length of the one-cycle LR schedule")
    flags.DEFINE_integer("num_records", harness.NUM_RECORDS, "training records: rows of the CLT memory bank "
                         "(1,442: the subset's training split; 17,400: full PTB-XL's)")
    flags.DEFINE_bool("trim", True, "JAX: return the compiler's freed heap to the OS after the warm-up steps, "
                      "as mvkt.train does (--notrim: the A/B of its effect on step time and memory)")
    flags.DEFINE_bool("quick", False, "smoke check: resnet1d_wang only (unless --archs), batch 16, 1 step x 2 rounds")
    flags.DEFINE_bool("no_torch", False, "skip the PyTorch reference")
    flags.DEFINE_multi_string("jax_env", [], "KEY=VALUE environment variable for the JAX workers only, "
                              "e.g. XLA_FLAGS=... (repeatable)")
    flags.DEFINE_enum("torch_device", "auto", ["auto", "cpu", "cuda"],
                      "where the PyTorch reference runs; auto: cuda when torch sees a GPU, else cpu")
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                      "compute dtype of both frameworks; bfloat16 changes the numerics (opt-in: "
                      "`student.dtype=bfloat16` in mvkt, autocast in PyTorch), so its rows are reported apart")
    flags.DEFINE_float("settle_s", 90.0, "longest wait before a row for the 1-minute load average to fall below "
                       "0.5 per core (0 on a GPU machine, where the step does not compete for the CPU cores)")
    flags.DEFINE_string("out", "benchmarks/results/train_step.json", "JSON results")
    flags.DEFINE_enum("worker", None, ["jax", "torch", "params", "matmul"], "internal: run as a worker process")
    flags.DEFINE_string("worker_arch", None, "internal: the worker's architecture")
    flags.DEFINE_string("worker_config", None, "internal: the worker's config")


def _args():
    """The parsed flags as one namespace (the workers and rows read ``args.<flag>``)."""
    args = harness.flag_values()
    args.archs, args.configs = ",".join(args.archs), ",".join(args.configs)
    if args.quick:
        if not flags.FLAGS["archs"].present:
            args.archs = "resnet1d_wang"
        args.batch_size, args.steps, args.repeats, args.warmup, args.num_batches = 16, 1, 2, 1, 2
    args.arch, args.config = args.worker_arch, args.worker_config
    return args


def _torch_reference(args) -> tuple[bool, str | None]:
    """(whether the PyTorch reference runs, why not); settles ``args.torch_device``."""
    torch_version = harness.torch_version()
    have_torch = torch_version is not None and not args.no_torch
    why = None
    if not have_torch:
        why = "--no_torch given" if args.no_torch else f"torch is not installed; install it with `{TORCH_INSTALL}`"
        print(f"PyTorch reference skipped ({why}): torch columns will be empty.", flush=True)
    elif torch_version.split("+")[0] != "2.13.0":
        print(f"note: torch {torch_version} installed; the reference numbers in docs/BENCHMARKS.md use 2.13.0")
    if args.torch_device == "auto":
        args.torch_device = "cpu"
        if have_torch:
            import torch
            args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    if have_torch:
        print(f"PyTorch reference on {args.torch_device}", flush=True)
    return have_torch, why


def _worker_report(args: list[str], env: dict | None = None) -> dict | None:
    """The last report line of a one-shot worker process (None if it printed none)."""
    cmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(harness.ROOT), env={**os.environ, **(env or {})})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(harness.MARK)]
    if out.returncode or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len(harness.MARK):])


def _parameter_check(archs: list[str], crop: int, have_torch: bool) -> dict:
    """Flax and PyTorch parameter counts per net, in a fresh process (the coordinator stays
    light); refuses to go on when the PyTorch port does not match the Flax nets."""
    report = _worker_report(["--worker=params", f"--archs={','.join(archs)}", f"--crop={crop}"])
    if report is None:
        raise SystemExit("parameter check failed (its error output is above)")
    counts = report["counts"]
    print("Parameter counts (net only, PyTorch layout shapes compared one to one):")
    mismatch = False
    for name, c in counts.items():
        if have_torch and "torch" in c:
            ok = c["torch"] == c["flax"] and c["shapes_match"]
            mismatch |= not ok
            print(f"  {name:28s} flax {c['flax']:>10,d}  torch {c['torch']:>10,d}  "
                  f"{'match' if ok else 'MISMATCH'}")
        else:
            print(f"  {name:28s} flax {c['flax']:>10,d}")
    if mismatch:
        raise SystemExit("the PyTorch reference does not match the Flax nets; refusing to compare them")
    return counts


def _matmul_rate(jax_env: dict) -> tuple[float | None, int]:
    matmul = _worker_report(["--worker=matmul"], env=jax_env) or {}
    matmul_gflops, matmul_n = matmul.get("gflops"), matmul.get("n", 2048)
    print(f"float32 matrix-multiply rate: {_fmt(matmul_gflops, '.0f')} GFLOP/s (load {os.getloadavg()[0]:.2f})")
    return matmul_gflops, matmul_n


def main(argv) -> int:
    del argv
    args = _args()
    if args.worker == "jax":
        jax_worker(args)
        return 0
    if args.worker == "torch":
        torch_reference.torch_worker(args)
        return 0
    if args.worker == "params":
        params_worker(args)
        return 0
    if args.worker == "matmul":
        matmul_worker(args)
        return 0

    archs = [a for a in args.archs.split(",") if a]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in harness.CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(harness.CONFIGS)}")
    if args.num_records < args.batch_size:
        raise SystemExit(f"--num_records={args.num_records} is below --batch_size={args.batch_size}: "
                         "a batch holds distinct records")
    jax_env = dict(kv.split("=", 1) for kv in args.jax_env)
    have_torch, why = _torch_reference(args)
    started = time.perf_counter()
    counts = _parameter_check(archs, args.crop, have_torch)
    matmul_gflops, matmul_n = _matmul_rate(jax_env)

    settings = {k: getattr(args, k) for k in ("archs", "configs", "steps", "repeats", "warmup", "batch_size",
                                              "crop", "num_batches", "total_steps", "quick", "torch_device",
                                              "settle_s", "precision", "num_records", "trim")}
    settings.update({"num_classes": harness.NUM_CLASSES, "num_leads": harness.NUM_LEADS,
                     "memory_bank_records": args.num_records,
                     "command": " ".join([os.path.basename(sys.executable)] + sys.argv)})
    env = harness.environment(jax_env=jax_env)
    out = pathlib.Path(args.out)
    if not out.is_absolute():
        out = harness.ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], table: str | None) -> None:
        # Rewritten after every row, so that a run cut short (a time limit on a lent GPU) keeps its rows.
        result = {"environment": {**env, "load_average": os.getloadavg()}, "settings": settings,
                  "param_counts": counts, "rows": rows, "complete": table is not None,
                  "matmul_gflops": matmul_gflops, "matmul_n": matmul_n, "busy_load": harness.busy_load(),
                  "markdown": table, "total_seconds": time.perf_counter() - started}
        if rows:
            result["environment"].update(device=rows[0]["device"], device_platform=rows[0]["platform"],
                                         num_devices=rows[0]["num_devices"])
        out.write_text(json.dumps(result, indent=2) + "\n")

    rows = []
    for arch in archs:
        for config in configs:
            t0 = time.perf_counter()
            row = bench_config(args, arch, config, have_torch, jax_env, matmul_gflops)
            rows.append(row)
            write(rows, None)
            t = row.get("torch")
            print(f"[{time.perf_counter() - started:6.0f}s] {arch} {config}: JAX {row['jax']['samples_per_s']:.1f}/s"
                  + (f", torch {t['samples_per_s']:.1f}/s, ratio {row['ratio']:.2f}" if t else "")
                  + f" ({time.perf_counter() - t0:.0f}s; load {row['load_average_start'][0]:.2f} -> "
                  f"{row['load_average_end'][0]:.2f}, others {row['other_processes_cpu_cores']:.2f} cores"
                  f"{', BUSY: do not publish' if row['busy'] else ''})", flush=True)

    table = speed_table(rows, why, matmul_gflops, matmul_n)
    print()
    print(table)
    write(rows, table)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    harness.define_flags(define_flags)
    app.run(main)
