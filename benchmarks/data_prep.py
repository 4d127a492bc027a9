"""Speed of the PTB-XL data path: records/s of the fast WFDB reader vs wfdb.rdsamp, and end to end.

    python -m benchmarks.data_prep [--src=../shared/datasets/ptbxl-subset-1819]

Prints a table and writes benchmarks/results/data_prep.json. The source folder is read
once before timing, so the figures are for a warm page cache (the second run of a
real preparation); `end_to_end` includes the worker pool start, label aggregation,
standardisation, writing the shards and their sha256s. The last two rows are the shard
check every training start runs (`mvkt.data.verify_shards` with its hash cache).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402



def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def define_flags() -> None:
    flags.DEFINE_string("src", "../shared/datasets/ptbxl-subset-1819", "PTB-XL folder (release layout, records100/).")
    flags.DEFINE_string("out_json", "benchmarks/results/data_prep.json", "Where to write the results.")
    flags.DEFINE_integer("rdsamp_records", 300, "Records read with wfdb.rdsamp for the baseline (it is slow).")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")


def main(argv):
    del argv
    args = harness.flag_values()
    import numpy as np
    import wfdb

    from data_prep import common, ptbxl
    from mvkt import data as data_lib

    src = pathlib.Path(args.src).resolve()
    db, _ = ptbxl.load_tables(src, "filename_lr")
    bases = [str(src / f) for f in db.filename_lr]
    sources = [common.Source(str(i), b, common.read_wfdb_source) for i, b in zip(db.ecg_id, bases)]
    cfg = common.SignalConfig(target_fs=100, expected_fs=100, fixed_seconds=10.0)
    n = len(sources)

    def read(workers):
        with tempfile.TemporaryDirectory() as scratch:
            for _, results in common.iter_loaded(sources, cfg, scratch_dir=scratch, num_workers=workers,
                                                 progress=False):
                bad = [reason for _, _, reason, _ in results if reason]
                if bad:
                    raise RuntimeError(bad[0])

    load_before = os.getloadavg()
    read(1)  # warm the page cache
    rows = []
    sub = bases[:args.rdsamp_records]
    t = _best(lambda: [wfdb.rdsamp(b) for b in sub], 1)
    rows.append(("wfdb.rdsamp, 1 process", len(sub), t))
    for workers in (1, 2):
        t = _best(lambda: read(workers), args.repeats)
        rows.append((f"fast reader + validation + scratch write, {workers} process{'es' if workers > 1 else ''}", n, t))
    with tempfile.TemporaryDirectory() as tmp:
        def prepare():
            ptbxl.prepare(src, pathlib.Path(tmp) / "out", overwrite=True, num_workers=2)
        t = _best(prepare, args.repeats)
        m = json.loads((pathlib.Path(tmp) / "out" / "manifest.json").read_text())
        # What every training start pays (mvkt.train verifies the shards first): hashing all
        # files once, then only a stat per file while they are unchanged.
        def verify_cold():
            with tempfile.TemporaryDirectory() as cache:
                data_lib.verify_shards(pathlib.Path(tmp) / "out", cache_dir=cache)

        t_verify = _best(verify_cold, args.repeats)
        with tempfile.TemporaryDirectory() as cache:
            data_lib.verify_shards(pathlib.Path(tmp) / "out", cache_dir=cache)
            t_cached = _best(lambda: data_lib.verify_shards(pathlib.Path(tmp) / "out", cache_dir=cache),
                             args.repeats)
    written = sum(m["splits"][s]["num_records"] for s in ("train", "val", "test"))
    rows.append(("end to end: ptbxl.prepare as run by the CLI (superdiagnostic, 100 Hz, 2 workers)", n, t))
    rows.append(("verify_shards before training: sha256 of every shard file (first start)", written, t_verify))
    rows.append(("verify_shards before training: files unchanged since verified (later starts)", written, t_cached))

    load = os.getloadavg()
    print(f"\nPTB-XL data path on {src} ({n} records, 100 Hz), {os.cpu_count()} CPU cores, warm cache, "
          f"load average before/after {load_before[0]:.2f}/{load[0]:.2f} (other processes share the cores)\n")
    print(f"{'what':82s} {'records':>8s} {'seconds':>8s} {'records/s':>10s}")
    for what, count, secs in rows:
        print(f"{what:82s} {count:8d} {secs:8.2f} {count / secs:10.0f}")
    result = {
        "command": "python -m benchmarks.data_prep --src=" + args.src,
        "source": str(src),
        "records": n,
        "records_written": written,
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load[0], 2)],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "wfdb": wfdb.__version__,
        "results": [{"what": w, "records": c, "seconds": round(s, 4), "records_per_s": round(c / s, 1)}
                    for w, c, s in rows],
    }
    out = pathlib.Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    harness.define_flags(define_flags)
    app.run(main)
