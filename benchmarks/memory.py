"""Where the train step's resident memory goes on CPU, JAX against PyTorch, row by row.

    python -m benchmarks.memory [--archs=resnet1d_wang,xresnet1d50] [--configs=teacher_bce,...]

For each row (arch x config of ``benchmarks/train_step.py``, batch 128, crop 250) three fresh
worker processes, one after another (each process's memory is its row's alone):

* JAX as ``mvkt.train`` runs it: the step built by ``harness.build_step``, compiled, two steps,
  then glibc's ``malloc_trim(0)`` (``mvkt.memory.release_freed_memory``, which the training
  loop calls after its first steps), then the peak counter is reset and five steps run. Between
  stages the worker trims too, so that each stage's growth is memory still in use, split into
  anonymous memory and file-backed pages (library code paged in; shared and evictable):

  - ``state_data_init``: parameters, optimizer state, the batches, the init programs;
  - ``step_program``: the compiled step executable (XLA:CPU's generated code, its module and
    buffer assignment);
  - ``first_run_runtime``: what XLA's runtime keeps after the first executions (thread pools'
    buffers, kernel caches);
  - ``step_working``: the peak during the five steps above the memory held before them, against
    XLA's own temporaries of the step (activations kept for the backward pass, convolution
    buffers);
  - ``programs_freed``: what deleting the step executable and clearing JAX's caches (the init
    programs and eager operations' programs too) gives back after the steps.
* JAX without the trim: the peak during five steps, as runs measured before the loop trimmed.
* PyTorch (``benchmarks/train_step.py``'s worker, eager, same nets and losses): the memory held
  after its warm-up steps and the peak during five steps, both above the RSS after its imports.

All numbers are MB above the process's RSS after its imports. Prints a table with the load
average of every row and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

WORKER = "--memory_worker"
TRAIN_STEP = ROOT / "benchmarks" / "train_step.py"
STEPS = 5


def resident() -> dict:
    """This process's resident memory in MB: anonymous and file-backed."""
    return {"anon": (harness.status_kb("RssAnon") or 0) / 1024, "file": (harness.status_kb("RssFile") or 0) / 1024}


def jax_worker(arch: str, config: str, trim: bool, batch_size: int = 128) -> None:
    import jax

    from mvkt import memory

    def settled() -> dict:
        if trim:
            gc.collect()
            memory.release_freed_memory()
        return resident()

    jax.numpy.zeros(1).block_until_ready()
    stages = {"imports": settled()}
    base_total = harness.rss_mb()
    built = harness.build_step(arch, config, batch_size=batch_size, crop=250, num_batches=4, total_steps=10_000,
                               precision="float32")
    training, batches, rng = built["training"], built["batches"], built["rng"]
    stages["built"] = settled()
    compiled = training.update.lower(training.state, batches[0], rng).compile()
    analysis = compiled.memory_analysis()
    stages["compiled"] = settled()
    state = training.state
    del training
    for i in range(2):
        state, _ = compiled(state, batches[i % 4], rng)
    jax.block_until_ready(state)
    stages["first_run"] = settled()
    held_total = harness.rss_mb() - base_total
    harness.reset_peak()
    for i in range(STEPS):
        state, _ = compiled(state, batches[i % 4], rng)
    jax.block_until_ready(state)
    peak = harness.hwm_mb() - base_total
    after_steps = settled()
    del compiled
    jax.clear_caches()
    stages["program_deleted"] = settled()

    def grown(later: str, earlier: str) -> dict:
        return {k: stages[later][k] - stages[earlier][k] for k in ("anon", "file")}

    harness.emit({
        "peak_during_steps_mb": peak, "held_before_steps_mb": held_total,
        "step_working_mb": peak - held_total,
        "state_data_init_mb": grown("built", "imports"), "step_program_mb": grown("compiled", "built"),
        "first_run_runtime_mb": grown("first_run", "compiled"),
        "programs_freed_mb": {k: after_steps[k] - stages["program_deleted"][k] for k in ("anon", "file")},
        "stages_mb": stages,
        "xla": {k: getattr(analysis, k) / 2**20 for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                          "alias_size_in_bytes", "temp_size_in_bytes")}})


def torch_row(arch: str, config: str) -> dict:
    """PyTorch's side of a row from train_step.py's worker: 2 warm-up steps, then ``STEPS``."""
    args = [f"--worker_arch={arch}", f"--worker_config={config}", "--batch_size=128", "--crop=250", "--warmup=2",
            "--num_batches=4", "--total_steps=10000", "--torch_device=cpu", "--precision=float32"]
    worker = harness.Worker("torch", TRAIN_STEP, args)
    try:
        worker.read()
        worker.send(f"run {STEPS}")
        worker.read()
        worker.send("done")
        done = worker.read()
        worker.proc.wait(timeout=60)
    finally:
        worker.close()
    return {"peak_during_steps_mb": done["peak_mb"], "held_before_steps_mb": done["held_before_steps_mb"],
            "step_working_mb": done["peak_mb"] - done["held_before_steps_mb"]}


def jax_row(arch: str, config: str, trim: bool, batch_size: int = 128) -> dict:
    # Compiled afresh in every worker: a step read from the persistent compilation cache leaves
    # another heap behind than a compilation, and rows must not depend on what ran before.
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", WORKER, arch, config, str(int(trim)),
                          str(batch_size)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith(harness.MARK)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {arch}/{config} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(harness.MARK):])


def define_flags() -> None:
    flags.DEFINE_list("archs", ["resnet1d_wang", "xresnet1d50"], "nets")
    flags.DEFINE_list("configs", ["teacher_bce", "mvkt_memory_bank", "mvkt_in_batch_cache"], "train_step configs")
    flags.DEFINE_bool("no_torch", False, "skip the PyTorch rows")
    flags.DEFINE_string("out", "benchmarks/results/memory.json", "JSON results")


def table(rows: list[dict]) -> str:
    def both(d: dict) -> str:
        return f"{d['anon']:.0f}+{d['file']:.0f}"

    head = ("| arch | config | JAX peak, no trim | JAX peak | PyTorch peak | JAX held before steps | PyTorch held | "
            "state, data, init | step program | first-run runtime | programs freed | JAX step working | "
            "XLA temporaries | PyTorch step working | load |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        j, t = r["jax"], r.get("torch") or {}
        tcell = (lambda k: f"{t[k]:.0f}" if k in t else "-")
        lines.append(
            f"| {r['arch']} | {r['config']} | {r['jax_no_trim']['peak_during_steps_mb']:.0f} | "
            f"{j['peak_during_steps_mb']:.0f} | {tcell('peak_during_steps_mb')} | {j['held_before_steps_mb']:.0f} | "
            f"{tcell('held_before_steps_mb')} | {both(j['state_data_init_mb'])} | {both(j['step_program_mb'])} | "
            f"{both(j['first_run_runtime_mb'])} | {both(j['programs_freed_mb'])} | {j['step_working_mb']:.0f} | "
            f"{j['xla']['temp_size_in_bytes']:.0f} | {tcell('step_working_mb')} | "
            f"{r['load_average_start']:.2f}/{r['load_average_end']:.2f}{' BUSY' if r['busy'] else ''} |")
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    args = harness.flag_values()
    have_torch = harness.torch_version() is not None and not args.no_torch
    if not have_torch:
        print("PyTorch rows skipped: " + ("--no_torch" if args.no_torch else "torch is not installed "
                                          "(pip install torch==2.13.0)"), flush=True)
    rows = []
    for arch in args.archs:
        for config in args.configs:
            harness.wait_for_quiet(60)
            load = os.getloadavg()[0]
            row = {"arch": arch, "config": config, "load_average_start": load,
                   "jax": jax_row(arch, config, True), "jax_no_trim": jax_row(arch, config, False)}
            if have_torch:
                row["torch"] = torch_row(arch, config)
            row["load_average_end"] = os.getloadavg()[0]
            row["busy"] = load > harness.busy_load()
            rows.append(row)
            print(table(rows).splitlines()[-1], flush=True)
    markdown = table(rows)
    print(markdown)
    pathlib.Path(args.out).write_text(json.dumps({
        "command": "python -m benchmarks.memory " + " ".join(sys.argv[1:]), "environment": harness.environment(),
        "units": "MB above the RSS after imports; anon+file = anonymous + file-backed pages",
        "rows": rows, "markdown": markdown}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        jax_worker(sys.argv[2], sys.argv[3], bool(int(sys.argv[4])), int(sys.argv[5]))
    else:
        harness.define_flags(define_flags)
        app.run(main)
