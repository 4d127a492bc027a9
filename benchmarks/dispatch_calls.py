"""The training loop's host work per call, as medians: dispatching a call and making its inputs.

    python -m benchmarks.dispatch_calls --data=/tmp/mvkt_end_to_end/shards_tiled [--epochs=2]

``benchmarks/end_to_end.py``'s host-cost rows divide phase totals by the steps; over a few
hundred steps those totals move by half between runs (a garbage collection or a thread switch
in one call weighs as much as tens of calls). This runs the same no-op trivial step (the step
reads nothing, so no device work is left and each call is host work alone), with the data on
the devices, for K = 1 and K = 10 steps per dispatch, each in its own process, and times every
call of ``Dispatcher.__call__`` (main thread: argument handling and the enqueueing of the
program) and of ``Dispatcher.produce`` (prefetch threads: record indices, crop starts, stacking,
global arrays). It reports medians per call and per step, the first call of each program left
out (compilation). Prints a table with the load average of every row and writes JSON
(default benchmarks/results/dispatch_calls.json). The shards: any prepared PTB-XL folder;
the tiled full-size one of end_to_end.py is what the issue's target is about.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

WORKER = "--dispatch_calls_worker"


def worker(out: str, argv: list[str]) -> None:
    """The no-op trivial run of end_to_end.py with every dispatch and produce call timed."""
    from benchmarks import end_to_end
    from mvkt import dispatch

    calls: dict[str, list[tuple[float, int]]] = {"dispatch": [], "produce": []}
    call, produce = dispatch.Dispatcher.__call__, dispatch.Dispatcher.produce

    def timed_call(self, state, feed, rng):
        steps = int(feed["index"].shape[0]) if feed["index"].ndim == 2 else 1
        start = time.perf_counter()
        result = call(self, state, feed, rng)
        calls["dispatch"].append((time.perf_counter() - start, steps))
        return result

    def timed_produce(self, chunk):
        start = time.perf_counter()
        result = produce(self, chunk)
        calls["produce"].append((time.perf_counter() - start, chunk[1]))
        return result

    dispatch.Dispatcher.__call__, dispatch.Dispatcher.produce = timed_call, timed_produce
    try:
        end_to_end.trivial_worker([end_to_end.NOOP_FLAG, *argv])
    except SystemExit as e:  # absl's app.run ends with sys.exit
        if e.code:
            raise
    finally:
        pathlib.Path(out).write_text(json.dumps(calls))


def summarise(calls: dict[str, list[tuple[float, int]]], k: int) -> dict:
    """Medians of the K-step calls (the K=1 calls for K=1), the first of each program left out."""
    row = {}
    for kind, timed in calls.items():
        seen, kept = set(), []
        for seconds, steps in timed:
            if kind == "dispatch" and steps not in seen:  # first call of a program: compilation
                seen.add(steps)
                continue
            if steps == k:
                kept.append(seconds)
        median = statistics.median(kept) if kept else float("nan")
        row[kind] = {"calls": len(kept), "median_ms_per_call": median * 1e3, "median_us_per_step": median / k * 1e6}
    return row


def main(argv) -> int:
    del argv
    args = harness.flag_values()
    rows = []
    started = time.perf_counter()
    for k in (1, 10):
        harness.wait_for_quiet(args.settle_s)
        load_start = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "calls.json"
            command = [sys.executable, "-m", "benchmarks.dispatch_calls", WORKER, str(out),
                       "--config=experiments/configs/teacher.py", f"--workdir={tmp}/run",
                       f"--config.data.dir={args.data}", f"--config.train.epochs={args.epochs}",
                       f"--config.train.steps_per_dispatch={k}", "--config.train.log_every_steps=50",
                       "--config.eval.every_epochs=1000"]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s)
            if done.returncode:
                raise SystemExit(f"K={k} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            row = {"steps_per_dispatch": k, **summarise(json.loads(out.read_text()), k),
                   "load_average_start": load_start[0], "load_average_end": os.getloadavg()[0]}
        row["busy"] = row["load_average_start"] > harness.busy_load()
        rows.append(row)
        print(f"K={k}: dispatch {row['dispatch']['median_us_per_step']:.0f} us/step, produce "
              f"{row['produce']['median_us_per_step']:.0f} us/step (load {row['load_average_start']:.2f})", flush=True)
    lines = ["| K | calls | dispatch ms/call | dispatch us/step | produce ms/call | produce us/step | load |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        d, p = r["dispatch"], r["produce"]
        lines.append(f"| {r['steps_per_dispatch']} | {d['calls']} | {d['median_ms_per_call']:.2f} | "
                     f"{d['median_us_per_step']:.0f} | {p['median_ms_per_call']:.2f} | {p['median_us_per_step']:.0f} | "
                     f"{r['load_average_start']:.2f}/{r['load_average_end']:.2f}{' BUSY' if r['busy'] else ''} |")
    markdown = "\n".join(lines)
    print("\n" + markdown)
    result = {"command": "python -m benchmarks.dispatch_calls " + " ".join(sys.argv[1:]),
              "environment": harness.environment(), "rows": rows, "markdown": markdown,
              "total_seconds": time.perf_counter() - started}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def define_flags() -> None:
    flags.DEFINE_string("data", "/tmp/mvkt_end_to_end/shards_tiled", "prepared PTB-XL shards (mvkt data dir)")
    flags.DEFINE_integer("epochs", 2, "epochs of each run")
    flags.DEFINE_float("settle_s", 90.0, "longest wait for a quiet machine before each row")
    flags.DEFINE_integer("timeout_s", 1200, "hard limit of each subprocess")
    flags.DEFINE_string("out", "benchmarks/results/dispatch_calls.json", "JSON results")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        worker(sys.argv[2], sys.argv[3:])
    else:
        harness.define_flags(define_flags)
        app.run(main)
