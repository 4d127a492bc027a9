"""Where the train step's time goes: per-op accounting of mvkt's jitted step on this machine.

    python benchmarks/profile_step.py --archs=resnet1d_wang,xresnet1d50 --configs=teacher_bce \
        --out=benchmarks/results/profile_step.json
    python benchmarks/profile_step.py --single_thread --out=benchmarks/results/profile_step_one_core.json

The step is built exactly as in `benchmarks/train_step.py` (``mvkt.step.build_training``,
same synthetic batches), compiled, warmed up, then ``--steps`` steps run under
``jax.profiler`` (perfetto trace). XLA:CPU records one trace event per executed thunk
(a fusion, a convolution, a custom call, a copy); each is matched with its instruction in
the compiled HLO (``compiled.as_text()``) and put in one category:

| category | what |
|---|---|
| `convolution fwd` | convolution thunks of the forward pass |
| `convolution input gradient` / `convolution weight gradient` | convolution thunks of the gradient (``transpose(jvp(...))`` in their op name, or no JAX op name: the weight-gradient convolutions XLA rewrites); a weight gradient's window spans the time axis |
| `transpose/copy` | fusions that only move data (names with ``transpose`` or ``copy``; e.g. the activations and gradients XLA transposes to [channels, time, batch] for the weight-gradient convolutions) |
| `reduction` | fusions whose root is a reduce: BatchNorm statistics and their gradients, pooling, loss sums |
| `elementwise` | other loop fusions (BatchNorm apply, ReLU, adds; the optimizer update is here too) |
| `dot` | matrix multiplies (heads, CLT projections) |
| `ynn/xnn fusion` | subgraphs XLA hands to YNNPACK/XNNPACK: 1x1 and other convolutions or dots with what was fused into them, BatchNorm reductions |
| `other` | anything else (custom calls, sort, rng) |

The table gives each category's share of the summed thunk time, the top operations by time
with their shapes, and the step's wall time; the load average is printed before and after
(a profile taken on a busy machine is marked). The JSON holds the categories and the
``--json_ops`` heaviest operations.

With all cores (the default), XLA:CPU runs its convolutions asynchronously on the Eigen thread
pool: their trace events end when the work is dispatched, so the summed op time misses most of
the convolution time, and the events of ops that overlap them are stretched. ``--single_thread``
pins the process to one core with ``--xla_cpu_multi_thread_eigen=false``: every op then runs
synchronously, the op times add up to the step, and each op's share is its real cost (on one
core: the same program, so the same ops, but about 1.8x slower in wall time).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

BUSY_LOAD = 1.5
SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) (\w[\w\-]*)\((.*)$")


def hlo_instructions(text: str) -> dict[str, dict]:
    """name -> {shape, opcode, op_name, root (for fusions: the fused computation's root opcode)}."""
    current = None
    roots: dict[str, str] = {}
    table: dict[str, dict] = {}
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        window = re.search(r"window=\{size=(\d+)", rest)
        table[name] = {"shape": shape, "opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                       "calls": calls.group(1) if calls else None, "computation": current,
                       "window": int(window.group(1)) if window else None}
        if line.lstrip().startswith("ROOT") and current:
            roots[current] = opcode
    for entry in table.values():
        if entry["calls"]:
            entry["root"] = roots.get(entry["calls"], "")
    return table


def category(name: str, entry: dict | None) -> str:
    opcode = entry["opcode"] if entry else ""
    op_name = entry["op_name"] if entry else ""
    if opcode == "convolution" or "conv" in name and opcode in ("", "custom-call"):
        # XLA rewrites weight-gradient convolutions into new instructions without a JAX op name.
        # A weight gradient's window spans the time axis and its output is kernel-sized; an
        # input gradient's window is the kernel and its output as long as the input.
        if "transpose(" not in op_name and op_name:
            return "convolution fwd"
        dims = re.match(r"\w+\[([\d,]*)\]", entry["shape"]) if entry else None
        length = [int(d) for d in dims.group(1).split(",")][1] if dims and dims.group(1).count(",") == 2 else 0
        window = (entry or {}).get("window") or 0
        return "convolution weight gradient" if window > length or not op_name else "convolution input gradient"
    if name.startswith(("ynn_fusion", "xnn_fusion")):
        return "ynn/xnn fusion"
    if "transpose" in name or "copy" in name or opcode in ("transpose", "copy"):
        return "transpose/copy"
    if opcode == "dot" or "dot" in name:
        return "dot"
    if opcode == "fusion" and entry and entry.get("root") in ("reduce", "tuple") or "reduce" in name:
        return "reduction"
    if opcode == "fusion" or "fusion" in name:
        return "elementwise"
    return "other"


def profile(arch: str, config: str, *, batch_size: int, crop: int, steps: int, warmup: int) -> dict:
    import jax

    built = harness.build_step(arch, config, batch_size=batch_size, crop=crop, num_batches=4, total_steps=10_000)
    training, batches, rng = built["training"], built["batches"], built["rng"]
    state = training.state
    lowered = training.update.lower(state, batches[0], rng)
    compiled = lowered.compile()
    instructions = hlo_instructions(compiled.as_text())
    flops = harness.step_flops(lowered, compiled)
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % len(batches)], rng)
    jax.block_until_ready(state)

    trace_dir = tempfile.mkdtemp(prefix="mvkt-profile-")
    load_start = os.getloadavg()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)], rng)
    jax.block_until_ready(state)
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    load_end = os.getloadavg()

    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in instructions:
            per_op[name] += e.get("dur", 0.0) / 1e3 / steps  # ms per step
    total = sum(per_op.values())
    by_category: dict[str, float] = collections.defaultdict(float)
    ops = []
    for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1]):
        entry = instructions.get(name)
        cat = category(name, entry)
        by_category[cat] += ms
        ops.append({"name": name, "ms_per_step": ms, "category": cat, "shape": entry["shape"] if entry else "",
                    "op_name": (entry["op_name"] if entry else "")[-120:]})
    return {
        "arch": arch, "config": config, "batch_size": batch_size, "crop": crop, "steps": steps,
        "step_wall_ms": wall * 1e3, "summed_thunk_ms": total,
        "gflop_per_step": flops / 1e9 if flops else None,
        "gflop_per_s": flops / 1e9 / wall if flops else None,
        "categories": {k: {"ms_per_step": v, "share": v / total if total else None}
                       for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "ops": ops, "load_average_start": load_start, "load_average_end": load_end,
        "busy": max(load_start[0], load_end[0]) > BUSY_LOAD,
    }


def markdown(result: dict, top: int) -> str:
    mark = " (BUSY: load above 1.5, do not publish)" if result["busy"] else ""
    mode = "one core, synchronous ops" if result.get("single_thread") else "all cores"
    lines = [f"### {result['arch']} {result['config']} (batch {result['batch_size']}, crop {result['crop']}, "
             f"{mode}){mark}",
             "",
             f"step wall {result['step_wall_ms']:.1f} ms, summed op time {result['summed_thunk_ms']:.1f} ms"
             + (f", {result['gflop_per_step']:.1f} GFLOP/step = {result['gflop_per_s']:.0f} GFLOP/s"
                if result["gflop_per_step"] else "")
             + f"; load {result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}", "",
             "| category | ms/step | share |", "|---|---:|---:|"]
    for name, c in result["categories"].items():
        lines.append(f"| {name} | {c['ms_per_step']:.1f} | {c['share']:.0%} |")
    lines += ["", f"Top {top} operations:", "", "| op | category | shape | ms/step |", "|---|---|---|---:|"]
    for op in result["ops"][:top]:
        lines.append(f"| `{op['name']}` | {op['category']} | `{op['shape'][:60]}` | {op['ms_per_step']:.2f} |")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_list("archs", ["resnet1d_wang", "xresnet1d50"], "mvkt.models architectures")
    flags.DEFINE_list("configs", ["teacher_bce"], f"subset of {', '.join(harness.CONFIGS)}")
    flags.DEFINE_integer("batch_size", 128, "global batch")
    flags.DEFINE_integer("crop", 250, "crop length in samples")
    flags.DEFINE_integer("steps", 5, "profiled steps")
    flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
    flags.DEFINE_integer("top", 12, "operations per table")
    flags.DEFINE_integer("json_ops", 40, "operations per profile kept in --out")
    flags.DEFINE_bool("single_thread", False,
                      f"one core, {SINGLE_THREAD_FLAG}: every op runs synchronously, so the op times add up "
                      "to the step (with the default threads, XLA:CPU's convolutions run asynchronously "
                      "and their trace events end at dispatch)")
    flags.DEFINE_string("out", "", "JSON results")


def main(argv) -> int:
    del argv
    args = harness.flag_values()
    if args.single_thread:
        if "jax" in sys.modules:
            raise SystemExit("--single_thread must be set before JAX is imported")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAG}".strip()
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    results = []
    for arch in args.archs:
        for config in args.configs:
            result = profile(arch, config, batch_size=args.batch_size, crop=args.crop, steps=args.steps,
                             warmup=args.warmup)
            result["single_thread"] = args.single_thread
            results.append(result)
            print(markdown(result, args.top), "\n", flush=True)
    if args.out:
        # The JSON keeps the heaviest operations (a step has hundreds; the categories sum all of them).
        kept = [{**r, "ops": r["ops"][:args.json_ops]} for r in results]
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps({"results": kept}, indent=1))
    return 0


if __name__ == "__main__":
    harness.define_flags(define_flags)
    app.run(main)
