"""How often the signal-quality gate (``mvkt.quality``) withholds a decision, on real records.

    python -m experiments.quality_gate [--data_dir=SHARDS --split=test] \
        [--noise_dir=../shared/datasets/nstdb] [--out=gate.json]

Measures the share of records the gate calls unusable: the embedded sample records (PTB-XL,
CPSC 2018, CinC; lead I and all 12 leads, as given), optionally a split of your own shards
(lead I and 12 leads, in mV), and 10-s segments of pure NSTDB noise (lead I, evaluation part,
at 100 Hz). Clean records should pass, noise should not: run it on your own data before you
trust the default thresholds there.
"""

from __future__ import annotations

import glob
import json
import pathlib

import numpy as np
from absl import app, flags

from experiments import cli
from mvkt import data as data_lib
from mvkt import noise as noise_lib
from mvkt import quality

SAMPLES = noise_lib.SAMPLE_NSTDB.parent


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "also measure a split of these shards")
    flags.DEFINE_enum("split", "test", list(data_lib.SPLITS), "split of --data_dir")
    flags.DEFINE_string("noise_dir", str(noise_lib.SAMPLE_NSTDB), "NSTDB noise records (default: the excerpt)")
    flags.DEFINE_integer("segments", 40, "10-s noise segments per NSTDB record")
    flags.DEFINE_string("out", None, "write the measurement to this JSON file")


def sample_records() -> dict[str, list[tuple[np.ndarray, float, list[str]]]]:
    """{database: [(samples (T, L) mV, fs, lead names)]} of the embedded samples."""
    from data_prep.records import read_any

    paths = {
        "ptbxl": [p[:-4] for p in sorted(glob.glob(str(SAMPLES / "ptbxl" / "records100" / "*" / "*.hea")))],
        "cpsc2018": sorted(glob.glob(str(SAMPLES / "cpsc2018" / "*.mat"))),
        "cinc": [p[:-4] for p in sorted(glob.glob(str(SAMPLES / "cinc" / "*.hea")))],
    }
    out = {}
    for group, names in paths.items():
        out[group] = []
        for path in names:
            signal, fs, leads = read_any(path)
            out[group].append((signal, fs, list(leads)))
    return out


def _rate(verdicts: list[dict]) -> dict:
    withheld = [v for v in verdicts if not v["usable"]]
    return {"records": len(verdicts), "unusable": len(withheld),
            "unusable_share": len(withheld) / len(verdicts) if verdicts else None}


def measure(*, data_dir: str | None = None, split: str = "test", noise_dir=noise_lib.SAMPLE_NSTDB,
            segments: int = 40, thresholds: quality.Thresholds = quality.DEFAULT_THRESHOLDS) -> dict:
    rows = {}
    groups = sample_records()
    for group, records in groups.items():
        rows[f"sample {group}, lead I"] = _rate([
            quality.assess(s[:, [leads.index("I")]], fs, ["I"], thresholds=thresholds) for s, fs, leads in records])
        rows[f"sample {group}, all leads"] = _rate([
            quality.assess(s, fs, leads, thresholds=thresholds) for s, fs, leads in records])
    if data_dir:
        part = data_lib.open_split(data_dir, split)
        stats = part.manifest["preprocessing"]["standardization"]
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        millivolts = [np.asarray(part.x[i], np.float64) * std + mean for i in range(len(part))]
        rows[f"{data_dir} {split}, lead I"] = _rate([
            quality.assess(r[:, :1], part.sampling_rate, ["I"], thresholds=thresholds) for r in millivolts])
        rows[f"{data_dir} {split}, all leads"] = _rate([
            quality.assess(r, part.sampling_rate, list(data_lib.LEADS), thresholds=thresholds) for r in millivolts])
    bank = noise_lib.load_nstdb(noise_dir, part="eval", sampling_rate=100)
    rng = np.random.default_rng(0)
    for kind in bank.kinds:
        rows[f"NSTDB {kind} noise alone, 10 s, lead I"] = _rate([
            quality.assess(bank.segment(kind, 1000, rng, num_leads=1), 100, ["I"], thresholds=thresholds)
            for _ in range(segments)])
    return {"thresholds": thresholds.as_dict(), "noise_dir": str(pathlib.Path(noise_dir).resolve()),
            "rows": rows}


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        f = flags.FLAGS
        result = measure(data_dir=f.data_dir, split=f.split, noise_dir=f.noise_dir, segments=f.segments)
        print(f"{'records':58s} {'unusable':>10s}")
        for name, row in result["rows"].items():
            print(f"{name:58s} {row['unusable']:4d}/{row['records']:<5d} ({row['unusable_share']:.1%})")
        if f.out:
            pathlib.Path(f.out).write_text(json.dumps(result, indent=2))
            print(f"wrote {f.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
