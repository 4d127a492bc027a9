"""Speed of the PTB-XL data path: records/s of the fast WFDB reader vs wfdb.rdsamp, and end to end.

    python -m benchmarks.data_prep [--src=../shared/datasets/ptbxl-subset-1819]

    python -m benchmarks.data_prep --scale_records=200000 [--work=/tmp/mvkt_prep_scale]

Prints a table and writes benchmarks/results/data_prep.json. The source folder is read
once before timing, so the figures are for a warm page cache (the second run of a
real preparation); `end_to_end` includes the worker pool start, label aggregation,
standardisation, writing the shards and their sha256s. The last two rows are the shard
check every training start runs (`mvkt.data.verify_shards` with its hash cache).

`--scale_records=N` instead prepares a tiled copy of the source with N records (`tile_ptbxl`:
the database table repeated with new ecg_ids and patient_ids, every row reading one of the
real records, folds kept) with the CLI in a subprocess, and reports records/s and the peak
memory of the whole process tree (the CLI and its workers, summed, sampled every 0.1 s) to
benchmarks/results/data_prep_scale.json: preparation streams records through scratch files,
so that peak must not grow with N.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
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


def tile_ptbxl(src: pathlib.Path, dst: pathlib.Path, records: int) -> pathlib.Path:
    """A PTB-XL folder at ``dst`` of ``records`` rows: ``src``'s table repeated (the last copy cut),
    each copy with its own ecg_ids and patient_ids (splits stay patient-disjoint) and the same
    folds and files (``records100`` linked). Written once; kept while its table is complete."""
    import pandas as pd

    table = dst / "ptbxl_database.csv"
    if table.is_file() and sum(1 for _ in open(table)) - 1 == records:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    db = pd.read_csv(src / "ptbxl_database.csv")
    copies = -(-records // len(db))
    step_id, step_patient = int(db.ecg_id.max()) + 1, int(db.patient_id.max()) + 1
    tiled = pd.concat([db.assign(ecg_id=db.ecg_id + c * step_id, patient_id=db.patient_id + c * step_patient)
                       for c in range(copies)]).iloc[:records]
    shutil.copy(src / "scp_statements.csv", dst / "scp_statements.csv")
    link = dst / "records100"
    if not link.exists():
        link.symlink_to((src / "records100").resolve(), target_is_directory=True)
    tiled.to_csv(dst / "ptbxl_database.csv.tmp", index=False)
    os.replace(dst / "ptbxl_database.csv.tmp", table)
    return dst


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of ``pid`` and all its descendants, MB: (all, anonymous). File pages
    mapped into a process count in the first; the second is memory the processes hold."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, anonymous, todo = 0.0, 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    anonymous += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total, anonymous


def scale(args) -> None:
    """Prepare a tiled copy of ``args.scale_records`` records; records/s and peak RSS of the tree."""
    import subprocess
    import threading

    work = pathlib.Path(args.work)
    src = tile_ptbxl(pathlib.Path(args.src).resolve(), work / "source", args.scale_records)
    out = work / "shards"
    harness.wait_for_quiet(120)
    load_before = os.getloadavg()
    command = [sys.executable, "-m", "data_prep.ptbxl", f"--src={src}", f"--out={out}", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0, 0.0]

    def sample():
        while proc.poll() is None:
            peak[:] = [max(a, b) for a, b in zip(peak, _tree_rss_mb(proc.pid))]
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"data prep failed ({proc.returncode}):\n{output[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    written = sum(manifest["splits"][s]["num_records"] for s in ("train", "val", "test"))
    shard_gb = sum(p.stat().st_size for p in out.iterdir()) / 2**30
    load = os.getloadavg()
    row = {"records": args.scale_records, "records_written": written, "seconds": round(seconds, 1),
           "records_per_s": round(written / seconds, 1), "peak_rss_tree_mb": round(peak[0], 1),
           "peak_rss_anon_tree_mb": round(peak[1], 1),
           "shards_gb": round(shard_gb, 2), "load_average_before_after": [round(load_before[0], 2), round(load[0], 2)]}
    print(f"\n{'records':>8s} {'written':>8s} {'seconds':>8s} {'records/s':>10s} {'peak RSS MB':>12s} "
          f"{'of it anon.':>12s} {'shards GB':>10s} {'load before/after':>18s}")
    print(f"{row['records']:8d} {written:8d} {seconds:8.1f} {row['records_per_s']:10.0f} {peak[0]:12.0f} "
          f"{peak[1]:12.0f} {shard_gb:10.2f} {load_before[0]:8.2f}/{load[0]:.2f}")
    result = {"command": f"python -m benchmarks.data_prep --scale_records={args.scale_records}",
              "what": "data_prep.ptbxl CLI (superdiagnostic, 100 Hz, float32) on a tiled copy of " + args.src,
              "peak_method": "sum of VmRSS (and of RssAnon) over the CLI process and its workers, sampled every 0.1 s",
              "environment": harness.environment(), "rows": [row]}
    path = pathlib.Path(args.out_json if flags.FLAGS["out_json"].present else "benchmarks/results/data_prep_scale.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text())["rows"] if path.is_file() else []
    result["rows"] = [r for r in runs if r["records"] != args.scale_records] + [row]
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def define_flags() -> None:
    flags.DEFINE_string("src", "../shared/datasets/ptbxl-subset-1819", "PTB-XL folder (release layout, records100/).")
    flags.DEFINE_string("out_json", "benchmarks/results/data_prep.json", "Where to write the results.")
    flags.DEFINE_integer("rdsamp_records", 300, "Records read with wfdb.rdsamp for the baseline (it is slow).")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")
    flags.DEFINE_integer("scale_records", 0, "> 0: prepare a tiled copy of --src with this many records instead")
    flags.DEFINE_string("work", "/tmp/mvkt_prep_scale", "--scale_records: where the tiled source and shards go")
    flags.DEFINE_bool("keep", False, "--scale_records: keep the shards")


def main(argv):
    del argv
    args = harness.flag_values()
    if args.scale_records:
        return scale(args)
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
