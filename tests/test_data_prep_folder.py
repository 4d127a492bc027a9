"""data_prep.folder: own recordings in WFDB, EDF, CSV and NumPy with a label table, made from
real records of the embedded PTB-XL sample (converted here into each format)."""

from __future__ import annotations

import ast
import csv
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import signal as sps

from data_prep import folder
from data_prep.common import DataPrepError
from data_prep.records import read_any
from data_prep.wfdb_io import LEADS, read_record
from experiments.configs import teacher as teacher_config
from helpers import tiny
from mvkt import data as data_lib
from mvkt import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PTBXL = REPO / "data_prep" / "samples" / "ptbxl"
FORMATS = ("wfdb", "edf", "csv", "npy")
CSV_NAMES = ["i", "MLII", "III", "AVR", "avl", "aVF", "v1", "V2", "V3", "V4", "V5", "V6"]  # case and an alias


def _ptbxl_rows(count: int) -> list[dict]:
    table = pd.read_csv(PTBXL / "ptbxl_database.csv")
    rows = []
    for row in table.head(count).itertuples():
        codes = ast.literal_eval(row.scp_codes)
        rows.append({"id": f"r{int(row.ecg_id):05d}", "base": PTBXL / row.filename_lr, "patient": str(int(row.patient_id)),
                     "label": "NORM" if codes.get("NORM", 0) > 0 else "ABN"})
    return rows


def _write_edf(path: pathlib.Path, signal: np.ndarray, fs: float, *, microvolts: bool = True,
               leads: tuple[str, ...] = LEADS) -> None:
    import edfio

    scale, unit = (1000.0, "uV") if microvolts else (1.0, "mV")
    signals = [edfio.EdfSignal(signal[:, k].astype(np.float64) * scale, sampling_frequency=fs, label=f"ECG {lead}",
                               physical_dimension=unit, physical_range=(-20.0 * scale, 20.0 * scale))
               for k, lead in enumerate(leads)]
    signals.append(edfio.EdfSignal(np.zeros(len(signal)), sampling_frequency=fs, label="Resp", physical_dimension="uV"))
    edfio.Edf(signals).write(path)


def _write_record(folder_dir: pathlib.Path, fmt: str, name: str, base: pathlib.Path) -> None:
    signal, fs = read_record(base)
    if fmt == "wfdb":
        for suffix in (".hea", ".dat"):
            text = base.with_suffix(suffix).read_bytes()
            if suffix == ".hea":
                text = text.replace(base.name.encode(), name.encode())
            (folder_dir / f"{name}{suffix}").write_bytes(text)
    elif fmt == "edf":  # at 250 Hz in microvolts: resampled and converted on the way in
        _write_edf(folder_dir / f"{name}.edf", sps.resample_poly(signal, 5, 2, axis=0), 250.0)
    elif fmt == "csv":
        with open(folder_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_NAMES)
            writer.writerows(np.round(signal, 4).tolist())
    else:
        np.save(folder_dir / f"{name}.npy", signal.astype(np.float32))


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, list[dict]]:
    """24 records, 6 in each format, with a label table (labels column, patients)."""
    src = tmp_path_factory.mktemp("own_records")
    rows = _ptbxl_rows(24)
    for i, row in enumerate(rows):
        row["format"] = FORMATS[i % 4]
        sub = src / ("site_a" if i % 2 else "site_b")
        sub.mkdir(exist_ok=True)
        _write_record(sub, row["format"], row["id"], row["base"])
    table = src / "labels.csv"
    pd.DataFrame({"record": [r["id"] for r in rows], "labels": [r["label"] for r in rows],
                  "patient": [r["patient"] for r in rows]}).to_csv(table, index=False)
    return src, table, rows


def test_each_format_reads_the_same_samples_as_the_wfdb_original(own_folder):
    src, _, rows = own_folder
    records, duplicates = folder.find_records(src, label_table=src / "labels.csv")
    assert not duplicates and len(records) == 24
    for row in rows[:4]:
        fmt, path = records[f"site_{'a' if rows.index(row) % 2 else 'b'}/{row['id']}"]
        original, fs = read_record(row["base"])
        source = folder._source(row["id"], fmt, path, fs=100.0, leads=tuple(LEADS))
        signal, rate = source.reader(source.path)
        if fmt == "edf":  # 250 Hz in uV in the file: compare after the importer's own resampling to 100 Hz
            assert rate == 250.0 and signal.shape == (2500, 12)
            back = sps.resample_poly(signal, 2, 5, axis=0)
            assert np.abs(back - original)[50:-50].max() < 0.01  # mV; the EDF digital resolution and filters
        else:
            assert rate == fs == 100.0
            np.testing.assert_allclose(signal, original, atol=1e-4 if fmt == "csv" else 1e-6)
    assert folder.canonical_lead("EKG-II") == folder.canonical_lead("MLII") == "II"
    assert folder.canonical_lead("Lead aVR") == "aVR" and folder.canonical_lead("Resp") is None


@pytest.fixture(scope="module")
def own_shards(own_folder, tmp_path_factory) -> pathlib.Path:
    src, table, _ = own_folder
    out = tmp_path_factory.mktemp("own_shards") / "shards"
    folder.main(["data_prep.folder", f"--src={src}", f"--labels={table}", f"--out={out}", "--fs=100",
                 f"--leads={','.join(LEADS)}", "--num_folds=4", "--train_folds=1,2", "--val_folds=3",
                 "--test_folds=4"])
    return out


def test_a_folder_of_four_formats_prepares_patient_wise_and_a_teacher_trains(own_folder, own_shards, tmp_path):
    _, _, rows = own_folder
    manifest = data_lib.load_manifest(own_shards)
    assert manifest["label_names"] == ["ABN", "NORM"] and manifest["sampling_rate"] == 100
    assert manifest["source_formats"] == sorted(FORMATS) and manifest["folds_from"] == "patients"
    assert sum(s["num_records"] for s in manifest["splits"].values()) == 24 and manifest["rejected"]["count"] == 0
    data_lib.verify_shards(own_shards)
    folds = {}
    for split in data_lib.SPLITS:
        opened = data_lib.open_split(own_shards, split)
        folds.update(zip(opened.record_ids, opened.folds))
    patient_of = {r["id"]: r["patient"] for r in rows}
    by_patient: dict[str, set] = {}
    for record, fold in folds.items():
        by_patient.setdefault(patient_of[record], set()).add(int(fold))
    assert all(len(f) == 1 for f in by_patient.values())  # no patient in two folds
    config = tiny(teacher_config.get_config(), own_shards, **{"train.batch_size": 4, "train.epochs": 1})
    assert train.train_and_evaluate(config, tmp_path / "teacher", progress=False)["finished"]


def test_one_hot_columns_and_given_folds_mean_the_same_as_the_labels_column(own_folder, tmp_path):
    src, _, rows = own_folder
    table = tmp_path / "onehot.csv"
    pd.DataFrame({"record": [r["id"] for r in rows], "ABN": [int(r["label"] == "ABN") for r in rows],
                  "NORM": [int(r["label"] == "NORM") for r in rows],
                  "fold": [1 + i % 4 for i in range(len(rows))]}).to_csv(table, index=False)
    parsed, names, rejected = folder.read_label_table(table)
    assert names == ["ABN", "NORM"] and not rejected
    assert {k: v["labels"] for k, v in parsed.items()} == {r["id"]: {r["label"]} for r in rows}
    manifest = folder.prepare(src, table, tmp_path / "out", fs=100, leads=LEADS,
                              split_folds={"train": [1, 2], "val": [3], "test": [4]})
    assert manifest["folds_from"] == "table" and manifest["splits"]["val"]["num_records"] == 6


def test_bad_inputs_are_named_in_rejected_csv_or_refused_in_one_line(own_folder, tmp_path):
    src, _, rows = own_folder
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    site = lambda i: bad / ("site_a" if i % 2 else "site_b")  # noqa: E731 (as the fixture lays them out)
    gone, wfdb_twice, no_v6, twice_in_table, ambiguous = (rows[i]["id"] for i in (0, 4, 2, 6, 1))
    for suffix in (".hea", ".dat"):                              # a row without a file (a WFDB record)
        (site(0) / f"{gone}{suffix}").unlink()
    np.save(site(4) / f"{wfdb_twice}.npy", np.zeros((1000, 12), np.float32))  # one name, two files
    np.save(bad / "extra.npy", np.zeros((1000, 12), np.float32))  # a file without a row
    shutil.copy(site(1) / f"{ambiguous}.edf", site(0) / f"{ambiguous}.edf")  # the same name in two folders
    pd.read_csv(site(2) / f"{no_v6}.csv").drop(columns=["V6"]).to_csv(site(2) / f"{no_v6}.csv", index=False)
    pd.DataFrame({"record": [r["id"] for r in rows] + [twice_in_table],
                  "labels": [r["label"] for r in rows] + ["NORM"]}).to_csv(bad / "labels.csv", index=False)
    with pytest.raises(DataPrepError, match=r"rejected, more than --max_rejected_fraction"):
        folder.prepare(bad, bad / "labels.csv", tmp_path / "refused", fs=100, leads=LEADS)
    manifest = folder.prepare(bad, bad / "labels.csv", tmp_path / "out", fs=100, leads=LEADS,
                              max_rejected_fraction=1.0)
    reasons = dict(pd.read_csv(tmp_path / "out" / "rejected.csv").itertuples(index=False))
    assert "no record file" in reasons[gone]
    assert "found twice" in reasons[f"site_b/{wfdb_twice}"]
    assert "has no row" in reasons["extra"]
    assert "2 record files match it" in reasons[ambiguous]
    assert "no signal for lead(s) V6" in reasons[no_v6]
    assert "2 rows" in reasons[twice_in_table]
    assert manifest["rejected"]["count"] == len(reasons) == 6
    pd.DataFrame({"record": [rows[3]["id"]], "NORM": ["yes"]}).to_csv(tmp_path / "words.csv", index=False)
    with pytest.raises(DataPrepError, match=r"label column\(s\) \['NORM'\] are not 0/1"):
        folder.prepare(src, tmp_path / "words.csv", tmp_path / "never", fs=100, leads=LEADS)
    with pytest.raises(DataPrepError, match="give --fs=HZ"):
        folder.prepare(src, src / "labels.csv", tmp_path / "never2")


def test_predict_reads_an_edf_file(own_folder, own_shards, tmp_path):
    src, _, rows = own_folder
    edf = next(src.rglob("*.edf"))
    signal, fs, leads = read_any(edf)
    assert fs == 250.0 and leads == list(LEADS) and signal.shape == (2500, 12)
    lead_i = tmp_path / "lead_i.edf"  # a single-lead wearable recording, in mV
    _write_edf(lead_i, signal[:, :1], 250.0, microvolts=False, leads=("I",))
    run = tmp_path / "student_bce"
    config = tiny(teacher_config.get_config(), own_shards, **{"train.batch_size": 4, "train.epochs": 1,
                                                              "trains": "student", "student.leads": "I"})
    train.train_and_evaluate(config, run, progress=False)
    result = subprocess.run([sys.executable, "-m", "experiments.predict", f"--workdir={run}", str(edf), str(lead_i)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(edf) in result.stdout and "NORM" in result.stdout
