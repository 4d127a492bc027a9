"""data_prep on the real in-project samples: labels, folds, standardisation, bad input, CLIs."""

from __future__ import annotations

import csv
import hashlib
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.io
import wfdb

from data_prep import cinc, common, cpsc2018, ptbxl
from data_prep.common import DataPrepError
from data_prep.folds import iterative_stratification
from data_prep.wfdb_io import LEADS, dx_codes
from mvkt import data as data_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_prep" / "samples"
PTBXL = SAMPLES / "ptbxl"


# --------------------------------------------------------------------------- helpers

def copy_ptbxl(dst: pathlib.Path, ids=None) -> pathlib.Path:
    """Copy (part of) the PTB-XL sample into dst, keeping the release layout."""
    dst.mkdir(parents=True)
    db = pd.read_csv(PTBXL / "ptbxl_database.csv")
    if ids is not None:
        db = db[db.ecg_id.isin(ids)]
    db.to_csv(dst / "ptbxl_database.csv", index=False)
    shutil.copy(PTBXL / "scp_statements.csv", dst)
    for f in db.filename_lr:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy(PTBXL / (f + ext), dst / (f + ext))
    return dst


def rec_base(src: pathlib.Path, ecg_id: int) -> pathlib.Path:
    return src / "records100" / "00000" / f"{ecg_id:05d}_lr"


def edit_header(base: pathlib.Path, fn) -> None:
    hea = base.with_suffix(".hea")
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join(fn(lines)) + "\n")


def set_field(line: str, i: int, value) -> str:
    tok = line.split()
    tok[i] = str(value)
    return " ".join(tok)


def fix_checksums(base: pathlib.Path) -> None:
    """Recompute the header checksums after editing samples, so only the intended defect remains."""
    lines = base.with_suffix(".hea").read_text().splitlines()
    n_sig, n = int(lines[0].split()[1]), int(lines[0].split()[3])
    d = np.fromfile(base.with_suffix(".dat"), dtype="<i2").reshape(n, n_sig)
    sums = d.sum(axis=0, dtype=np.int64) % 65536
    edit_header(base, lambda ls: [ls[0]] + [set_field(ls[1 + k], 6, int(sums[k])) for k in range(n_sig)]
                + ls[1 + n_sig:])


def read_rejected(out: pathlib.Path) -> dict[str, str]:
    with open(out) as f:
        return {row["record"]: row["reason"] for row in csv.DictReader(f)}


def hashes(out: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def sample_tables():
    db, st = ptbxl.load_tables(PTBXL, "filename_lr")
    codes = {int(r.ecg_id): ptbxl.parse_scp_codes(r.scp_codes) for r in db.itertuples()}
    return codes, st


# --------------------------------------------------------------------------- PTB-XL labels

# Expected label sets read by hand from ptbxl_database.csv + scp_statements.csv:
#   1: {'NORM','LVOLT','SR'}   17: {'AFLT','ABQRS','AFIB'}   45: {'IRBBB','RAO/RAE','RVH','SR'}
#  39: {'IMI','LNGQT','NST_','DIG','ABQRS','SR'}  (NST_/DIG/LNGQT are diagnostic STTC *and* form)
HAND_CHECKED = {
    "superdiagnostic": {1: {"NORM"}, 17: set(), 39: {"MI", "STTC"}, 45: {"CD", "HYP"}},
    "subdiagnostic": {1: {"NORM"}, 17: set(), 39: {"IMI", "STTC", "NST_"}, 45: {"IRBBB", "RAO/RAE", "RVH"}},
    "diagnostic": {1: {"NORM"}, 17: set(), 39: {"IMI", "LNGQT", "NST_", "DIG"}, 45: {"IRBBB", "RAO/RAE", "RVH"}},
    "form": {1: {"LVOLT"}, 17: {"ABQRS"}, 39: {"LNGQT", "NST_", "DIG", "ABQRS"}, 45: set()},
    "rhythm": {1: {"SR"}, 17: {"AFLT", "AFIB"}, 39: {"SR"}, 45: {"SR"}},
    "all": {1: {"NORM", "LVOLT", "SR"}, 17: {"AFLT", "ABQRS", "AFIB"},
            39: {"IMI", "LNGQT", "NST_", "DIG", "ABQRS", "SR"}, 45: {"IRBBB", "RAO/RAE", "RVH", "SR"}},
}


@pytest.mark.parametrize("task", ptbxl.TASKS)
def test_label_aggregation_hand_checked(task):
    codes, st = sample_tables()
    ids = sorted(codes)
    sets, names = ptbxl.compute_labels([codes[i] for i in ids], st, task)
    by_id = dict(zip(ids, sets))
    for ecg_id, expected in HAND_CHECKED[task].items():
        assert by_id[ecg_id] == expected, (task, ecg_id)
    assert names == sorted(names) and set().union(*sets) == set(names)


def test_task_statement_counts_match_the_benchmark():
    _, st = sample_tables()
    sizes = {t: len(ptbxl.task_statements(st, t)) for t in ptbxl.TASKS}
    assert sizes == {"all": 71, "diagnostic": 44, "subdiagnostic": 44, "superdiagnostic": 44,
                     "form": 19, "rhythm": 12}
    assert len(set(ptbxl.task_statements(st, "subdiagnostic").values())) == 23
    assert sorted(set(ptbxl.task_statements(st, "superdiagnostic").values())) == ["CD", "HYP", "MI", "NORM", "STTC"]


def test_scp_codes_with_none_likelihoods_are_labelled_by_key():
    _, st = sample_tables()
    codes = ptbxl.parse_scp_codes("{'IMI': None, 'SR': None}")
    assert ptbxl.aggregate(codes, ptbxl.task_statements(st, "superdiagnostic")) == {"MI"}


def test_superdiagnostic_shards(ptbxl_sample_shards):
    out = ptbxl_sample_shards
    m = json.loads((out / "manifest.json").read_text())
    assert m["label_names"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert m["leads"] == list(LEADS) and m["sampling_rate"] == 100 and m["ragged"] is False
    # Sample folds: 1-8 hold 67 records, fold 9 21, fold 10 12; 5 of fold 9 lack a diagnostic
    # statement (e.g. ecg_id 17: AFLT, ABQRS, AFIB only) and are dropped.
    assert {s: m["splits"][s]["num_records"] for s in ("train", "val", "test")} == {"train": 67, "val": 16, "test": 12}
    assert m["dropped_no_label"] == 5 and m["rejected"]["count"] == 0
    assert m["splits"]["train"]["folds"] == list(range(1, 9))
    db = pd.read_csv(PTBXL / "ptbxl_database.csv").set_index("ecg_id")
    seen = set()
    for s, folds in (("train", set(range(1, 9))), ("val", {9}), ("test", {10})):
        split = data_lib.open_split(out, s)
        ids = [int(i) for i in split.record_ids]
        assert ids == sorted(ids) and set(split.folds.tolist()) <= folds
        assert [db.strat_fold[i] for i in ids] == split.folds.tolist()
        assert split.x.shape == (len(ids), 1000, 12) and split.x.dtype == np.float32
        assert m["splits"][s]["label_counts"] == dict(zip(m["label_names"], split.y.sum(0).tolist()))
        seen |= set(ids)
    assert 17 not in seen and len(seen) == 95
    train = data_lib.open_split(out, "train")
    assert train.y[list(train.record_ids).index("1")].tolist() == [0, 0, 0, 1, 0]  # ecg_id 1 is NORM


def test_signals_equal_wfdb_reading_standardised(ptbxl_sample_shards):
    m = json.loads((ptbxl_sample_shards / "manifest.json").read_text())
    mean = np.array(m["preprocessing"]["standardization"]["mean"])
    std = np.array(m["preprocessing"]["standardization"]["std"])
    val = data_lib.open_split(ptbxl_sample_shards, "val")
    for i in (0, len(val) - 1):
        sig, fields = wfdb.rdsamp(str(PTBXL / "records100" / "00000" / f"{int(val.record_ids[i]):05d}_lr"))
        order = [[n.lower() for n in fields["sig_name"]].index(lead.lower()) for lead in LEADS]
        np.testing.assert_allclose(val.record(i), (sig[:, order] - mean) / std, atol=1e-4)


def test_scaler_fitted_on_train_only(tmp_path):
    src = copy_ptbxl(tmp_path / "src")
    first = ptbxl.prepare(src, tmp_path / "a")
    # Multiply every val/test record by 1000 (gain 1000 -> 1): train statistics must not move.
    db = pd.read_csv(src / "ptbxl_database.csv")
    for f in db[db.strat_fold >= 9].filename_lr:
        edit_header(src / f, lambda ls: [ls[0]] + [set_field(l, 2, "1.0(0)/mV") for l in ls[1:13]] + ls[13:])
    second = ptbxl.prepare(src, tmp_path / "b")
    st1, st2 = (x["preprocessing"]["standardization"] for x in (first, second))
    assert st1 == st2 and st1["fitted_on"] == "train"
    # ... and equal the statistics computed directly from the train records with wfdb.
    train_ids = data_lib.open_split(tmp_path / "a", "train").record_ids
    raw = np.concatenate([wfdb.rdsamp(str(rec_base(src, int(i))))[0] for i in train_ids])
    np.testing.assert_allclose(st1["mean"], raw.mean(0), atol=1e-6)
    np.testing.assert_allclose(st1["std"], raw.std(0), rtol=1e-5)
    # The val split was scaled by 1000 in the second source, standardised with the same stats.
    v1 = data_lib.open_split(tmp_path / "a", "val").record(0)
    v2 = data_lib.open_split(tmp_path / "b", "val").record(0)
    mean, std = np.array(st1["mean"]), np.array(st1["std"])
    np.testing.assert_allclose(v2 * std + mean, (v1 * std + mean) * 1000, rtol=1e-3, atol=1e-2)


def test_split_folds_are_configurable_and_patient_disjointness_is_asserted(tmp_path):
    m = ptbxl.prepare(PTBXL, tmp_path / "o", split_folds={"train": [1, 2, 3], "val": [4], "test": [5]})
    assert [m["splits"][s]["num_records"] for s in ("train", "val", "test")] == [26, 10, 8]
    assert m["unassigned_records"] == 95 - 44
    src = copy_ptbxl(tmp_path / "src")
    db = pd.read_csv(src / "ptbxl_database.csv")
    db.loc[db.ecg_id == 28, "strat_fold"] = 10  # patient 13619 also has ecg_id 39 in fold 9
    db.to_csv(src / "ptbxl_database.csv", index=False)
    with pytest.raises(DataPrepError, match=r"patient_id 13619 .* splits must be patient-disjoint"):
        ptbxl.prepare(src, tmp_path / "p")
    with pytest.raises(DataPrepError, match="fold 9 is assigned to both"):
        ptbxl.prepare(PTBXL, tmp_path / "q", split_folds={"train": [1, 9], "val": [9], "test": [10]})


# --------------------------------------------------------------------------- bad input

def test_each_bad_record_is_rejected_with_its_reason(tmp_path):
    src = copy_ptbxl(tmp_path / "src")
    b = lambda i: rec_base(src, i)  # noqa: E731
    b(2).with_suffix(".dat").unlink()                                            # missing .dat
    b(3).with_suffix(".hea").unlink()                                            # missing .hea
    data = b(4).with_suffix(".dat").read_bytes()
    b(4).with_suffix(".dat").write_bytes(data[:len(data) // 2])                  # truncated
    edit_header(b(5), lambda ls: [set_field(ls[0], 3, 900)] + ls[1:])            # header/signal mismatch
    edit_header(b(6), lambda ls: [set_field(ls[0], 1, 11)] + ls[1:12])           # wrong lead count
    edit_header(b(7), lambda ls: ls[:12] + [set_field(ls[12], 8, "V7")])          # wrong lead name
    d = np.fromfile(b(8).with_suffix(".dat"), dtype="<i2")
    d[100] = -32768                                                              # NaN sample (WFDB invalid)
    d.tofile(b(8).with_suffix(".dat"))
    fix_checksums(b(8))
    d = np.fromfile(b(9).with_suffix(".dat"), dtype="<i2")
    d[5] += 7                                                                    # corrupted byte
    d.tofile(b(9).with_suffix(".dat"))
    edit_header(b(10), lambda ls: [set_field(ls[0], 3, 0)] + ls[1:])              # zero length
    b(10).with_suffix(".dat").write_bytes(b"")
    edit_header(b(11), lambda ls: [set_field(ls[0], 2, 250)] + ls[1:])            # wrong sampling rate
    db = pd.read_csv(src / "ptbxl_database.csv")
    db.loc[db.ecg_id == 12, "scp_codes"] = "{'NORM': 100.0, 'XYZ': None}"        # unknown code
    db.loc[db.ecg_id == 13, "scp_codes"] = "{'NORM': 100.0"                      # unparseable
    db.to_csv(src / "ptbxl_database.csv", index=False)

    m = ptbxl.prepare(src, tmp_path / "out", max_rejected_fraction=0.2)
    rejected = read_rejected(tmp_path / "out" / "rejected.csv")
    expected = {"2": "missing signal file 00002_lr.dat", "3": "missing header", "4": "truncated 00004_lr.dat",
                "5": "header/signal mismatch", "6": "wrong lead count 11", "7": "not the 12 standard leads",
                "8": "missing samples (NaN", "9": "checksum mismatch", "10": "zero-length",
                "11": "wrong sampling rate 250 Hz (expected 100 Hz)", "12": "unknown SCP statement(s) ['XYZ']",
                "13": "unparseable scp_codes"}
    assert set(rejected) == set(expected)
    for rid, text in expected.items():
        assert text in rejected[rid], (rid, rejected[rid])
    assert m["rejected"]["count"] == 12
    assert sum(m["splits"][s]["num_records"] for s in ("train", "val", "test")) == 95 - 12


def test_too_many_rejections_fail_and_write_nothing(tmp_path):
    src = copy_ptbxl(tmp_path / "src", ids=range(1, 41))
    for i in range(1, 4):
        rec_base(src, i).with_suffix(".dat").unlink()
    out = tmp_path / "out"
    # task "all": every record has a statement, so all 40 count.
    with pytest.raises(DataPrepError, match=r"3 of 40 records \(7.5%\) rejected.*max_rejected_fraction=0.05") as e:
        ptbxl.prepare(src, out, task="all")
    assert str(tmp_path / "out.rejected.csv") in str(e.value)
    assert len(read_rejected(tmp_path / "out.rejected.csv")) == 3
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.rejected.csv", "src"]
    ptbxl.prepare(src, out, task="all", max_rejected_fraction=0.1)  # the same input passes a looser threshold
    assert out.is_dir()


def test_missing_required_files_and_columns(tmp_path):
    src = copy_ptbxl(tmp_path / "src", ids=range(1, 11))
    (src / "scp_statements.csv").rename(tmp_path / "st.csv")
    with pytest.raises(DataPrepError, match=r"missing required file .*scp_statements.csv"):
        ptbxl.prepare(src, tmp_path / "o")
    shutil.copy(tmp_path / "st.csv", src / "scp_statements.csv")
    pd.read_csv(src / "ptbxl_database.csv").drop(columns="strat_fold").to_csv(src / "ptbxl_database.csv")
    with pytest.raises(DataPrepError, match=r"ptbxl_database.csv: missing required column\(s\) \['strat_fold'\]"):
        ptbxl.prepare(src, tmp_path / "o")
    with pytest.raises(DataPrepError, match="unknown task"):
        ptbxl.prepare(PTBXL, tmp_path / "o", task="superclass")
    with pytest.raises(DataPrepError, match="missing required column"):
        ref = tmp_path / "cpsc"
        ref.mkdir()
        shutil.copy(SAMPLES / "cpsc2018" / "A1980.mat", ref)
        (ref / "REFERENCE.csv").write_text("Record,Label\nA1980,1\n")
        cpsc2018.prepare(ref, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_rerun_refuses_without_overwrite_and_is_idempotent_with_it(tmp_path, capsys):
    src = copy_ptbxl(tmp_path / "src", ids=range(1, 31))
    out = tmp_path / "out"
    argv = ["ptbxl", f"--src={src}", f"--out={out}"]
    ptbxl.main(argv)
    first = hashes(out)
    assert data_lib.verify_shards(out) == len(first) - 1  # every file but the manifest itself
    with pytest.raises(SystemExit) as e:
        ptbxl.main(argv)
    assert e.value.code == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert hashes(out) == first
    ptbxl.main(argv + ["--overwrite"])
    assert hashes(out) == first
    # A failing --overwrite run leaves the previous output untouched and no temporary folder.
    rec_base(src, 1).with_suffix(".dat").unlink()
    rec_base(src, 2).with_suffix(".dat").unlink()
    with pytest.raises(SystemExit):
        ptbxl.main(argv + ["--overwrite"])
    assert "rejected, more than --max_rejected_fraction" in capsys.readouterr().err
    assert hashes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.rejected.csv", "src"]


def test_cli_subprocess_exit_code_and_message(tmp_path):
    missing = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, "-m", "data_prep.ptbxl", f"--src={missing}", f"--out={tmp_path / 'o'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"data_prep.ptbxl: error: --src {missing} is not a folder" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DataPrepError, match=r"cannot reach physionet.org.*manually.*ptb-xl/1.0.3") as e:
        ptbxl.prepare(tmp_path / "ptbxl", tmp_path / "out", download_first=True)
    assert str(tmp_path / "ptbxl" / "ptbxl_database.csv") in str(e.value)


def test_float16_band_pass_and_resampling_are_recorded(tmp_path):
    src = copy_ptbxl(tmp_path / "src", ids=range(1, 31))
    m = ptbxl.prepare(src, tmp_path / "o", dtype="float16", band_pass=["0.5", "40"])
    assert m["dtype"] == "float16" and m["preprocessing"]["band_pass"] == [0.5, 40.0]
    split = data_lib.open_split(tmp_path / "o", "train")
    assert split.x.dtype == np.float16 and split.crop([0], [0], 50).dtype == np.float32
    ptbxl.prepare(src, tmp_path / "p")
    plain = data_lib.open_split(tmp_path / "p", "train")
    assert not np.allclose(split.record(0), plain.record(0), atol=0.05)
    with pytest.raises(DataPrepError, match="Nyquist"):
        ptbxl.prepare(src, tmp_path / "q", band_pass=[0.5, 60])


# --------------------------------------------------------------------------- CPSC 2018

CPSC_EXPECTED = {"A1980": {"PAC"}, "A1981": {"STD"}, "A1982": {"I-AVB"}, "A1983": {"Normal"},
                 "A1984": {"STD"}, "A1985": {"STD"}, "A1986": {"RBBB"}, "A1987": {"RBBB"},
                 "A1988": {"I-AVB"}, "A1989": {"I-AVB"}}  # REFERENCE.csv rows 6, 8, 3, 1, 8, 8, 5, 5, 3, 3


def split_labels(out):
    found = {}
    for s in ("train", "val", "test"):
        split = data_lib.open_split(out, s)
        for rid, y in zip(split.record_ids, split.y):
            found[str(rid)] = {n for n, v in zip(split.label_names, y) if v}
    return found


def test_cpsc_original_format_joins_unsorted_reference(tmp_path):
    ref = pd.read_csv(SAMPLES / "cpsc2018" / "REFERENCE.csv")
    assert len(ref) == 6877 and not ref.Recording.is_monotonic_increasing
    m = cpsc2018.prepare(SAMPLES / "cpsc2018", tmp_path / "o")
    assert m["ragged"] and m["source_format"] == "original" and m["preprocessing"]["resampled_from"] == 500
    assert m["label_names"] == sorted(cpsc2018.CLASSES.values())
    assert split_labels(tmp_path / "o") == CPSC_EXPECTED
    # REFERENCE rows of records absent from the sample are listed, not counted.
    assert m["rejected"] == {"count": 6867, "file": "rejected.csv", "counted": 0, "not_counted": 6867,
                             "max_rejected_fraction": 0.05}
    # Stored uncropped at 100 Hz: ceil(N / 5) samples (resample_poly keeps the last partial one).
    n500 = {p.stem: scipy.io.loadmat(p)["ECG"]["data"][0, 0].shape[1] for p in (SAMPLES / "cpsc2018").glob("*.mat")}
    for s in ("train", "val", "test"):
        split = data_lib.open_split(tmp_path / "o", s)
        assert [-(-n500[str(r)] // 5) for r in split.record_ids] == split.lengths.tolist()


def test_cpsc_bad_records(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "cpsc2018", src)
    mat = scipy.io.loadmat(src / "A1980.mat")
    mat["ECG"]["data"][0, 0][3, 10] = np.inf
    scipy.io.savemat(src / "A1980.mat", {"ECG": mat["ECG"]})                      # inf sample
    mat["ECG"]["data"][0, 0] = mat["ECG"]["data"][0, 0][:11]
    scipy.io.savemat(src / "A1981.mat", {"ECG": mat["ECG"]})                      # 11 leads
    data = (src / "A1982.mat").read_bytes()
    (src / "A1982.mat").write_bytes(data[:1000])                                 # truncated
    shutil.copy(src / "A1983.mat", src / "A9999.mat")                            # no REFERENCE row
    ref = (src / "REFERENCE.csv").read_text().replace("A1984,8,,", "A1984,12,,")
    (src / "REFERENCE.csv").write_text(ref)                                      # unknown class
    # One fold, all train: only two records survive, too few for ten folds.
    m = cpsc2018.prepare(src, tmp_path / "o", max_rejected_fraction=1.0, num_folds=1,
                         split_folds={"train": [1], "val": [], "test": []})
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "NaN/inf samples in lead aVR" in rejected["A1980"]
    assert "wrong lead count" in rejected["A1981"]
    assert "unreadable .mat" in rejected["A1982"]
    assert "A9999.mat has no row in REFERENCE.csv" in rejected["A9999"]
    assert "unknown class code(s) ['12']" in rejected["A1984"]
    assert "row in REFERENCE.csv but no A0001.mat" in rejected["A0001"]
    assert m["rejected"]["counted"] == 5
    assert split_labels(tmp_path / "o") == {r: CPSC_EXPECTED[r] for r in ("A1983", "A1985", "A1986", "A1987",
                                                                           "A1988", "A1989")}
    with pytest.raises(DataPrepError, match=r"5 of 11 records .* rejected"):
        cpsc2018.prepare(src, tmp_path / "p")


def test_cpsc_cinc_format_maps_snomed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for rid in ("A0001", "A0002", "A0003", "Q0001"):
        for ext in (".hea", ".mat"):
            shutil.copy(SAMPLES / "cinc" / (rid + ext), src)
    shutil.copy(src / "Q0001.hea", src / "A0004.hea")  # CPSC-Extra codes under a CPSC name
    shutil.copy(src / "Q0001.mat", src / "A0004.mat")
    m = cpsc2018.prepare(src, tmp_path / "o", max_rejected_fraction=0.5)
    assert m["source_format"] == "cinc"
    # #Dx: A0001 59118001 (RBBB), A0002 426783006 (sinus rhythm), A0003 164889003 (AF)
    assert split_labels(tmp_path / "o") == {"A0001": {"RBBB"}, "A0002": {"Normal"}, "A0003": {"AF"}}
    assert "unknown SNOMED code(s) ['164867002', '427084000']" in read_rejected(tmp_path / "o" / "rejected.csv")["A0004"]


def test_stratified_folds_on_the_real_cpsc_label_distribution():
    ref = pd.read_csv(SAMPLES / "cpsc2018" / "REFERENCE.csv", dtype=str)
    sets = [{int(float(v)) for v in row[1:] if isinstance(v, str)} for row in ref.itertuples(index=False)]
    y = np.array([[k in s for k in range(1, 10)] for s in sets])
    folds = iterative_stratification(y, num_folds=10, seed=0)
    assert folds.min() == 1 and folds.max() == 10
    sizes = np.bincount(folds, minlength=11)[1:]
    # Labels are balanced first (every class within one record of its tenth; a random
    # assignment is off by ~30), fold sizes second (multi-label rows move them a little).
    per_class = np.stack([y[folds == f].sum(0) for f in range(1, 11)])
    assert np.abs(per_class - y.sum(0) / 10).max() <= 1
    assert np.abs(sizes - len(y) / 10).max() <= 0.02 * len(y) / 10
    np.testing.assert_array_equal(folds, iterative_stratification(y, num_folds=10, seed=0))
    assert (folds != iterative_stratification(y, num_folds=10, seed=1)).any()


# --------------------------------------------------------------------------- CinC

def test_cinc_dx_parsing_and_mapping(tmp_path):
    assert dx_codes(SAMPLES / "cinc" / "HR00001.hea") == ["251146004", "426783006"]
    assert dx_codes(SAMPLES / "cinc" / "JS00001.hea") == ["164889003", "59118001", "164934002"]
    m = cinc.prepare(SAMPLES / "cinc", tmp_path / "all")
    expected = {}
    for hea in (SAMPLES / "cinc").glob("*.hea"):
        line = [ln for ln in hea.read_text().splitlines() if ln.startswith("#Dx:")][0]
        expected[hea.stem] = set(line.split(":", 1)[1].strip().split(","))
    assert split_labels(tmp_path / "all") == expected
    assert m["label_names"] == sorted(set().union(*expected.values())) and m["ragged"]
    mapping = tmp_path / "dx_mapping_scored.csv"
    mapping.write_text("Dx,SNOMEDCTCode,Abbreviation\nsinus rhythm,426783006,NSR\n"
                       "right bundle branch block,59118001,RBBB\ncomplete right bundle branch block,713427006,RBBB\n")
    m = cinc.prepare(SAMPLES / "cinc", tmp_path / "mapped", mapping=mapping)
    assert m["label_names"] == ["NSR", "RBBB"]
    labelled = {k: {"NSR" if "426783006" in v else None, "RBBB" if "59118001" in v else None} - {None}
                for k, v in expected.items()}
    assert split_labels(tmp_path / "mapped") == {k: v for k, v in labelled.items() if v}
    assert m["dropped_no_label"] == sum(not v for v in labelled.values())


def test_cinc_bad_header(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "cinc", src)
    text = (src / "E00001.hea").read_text()
    (src / "E00001.hea").write_text(text.replace("#Dx: 426783006", "#Dx: sinus"))
    (src / "E00002.hea").write_text((src / "E00002.hea").read_text().replace("#Dx:", "#Diagnosis:"))
    cinc.prepare(src, tmp_path / "o", max_rejected_fraction=0.5)
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "invalid SNOMED code(s) ['sinus']" in rejected["E00001"]
    assert "no #Dx line" in rejected["E00002"]


def test_other_wfdb_formats_fall_back_to_wfdb(tmp_path):
    from data_prep.wfdb_io import read_record

    fast, fs = read_record(rec_base(PTBXL, 1))
    rec = wfdb.rdrecord(str(rec_base(PTBXL, 1)), physical=False)
    wfdb.wrsamp("00001_lr", fs=100, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal,
                fmt=["24"] * 12, adc_gain=rec.adc_gain, baseline=rec.baseline, write_dir=str(tmp_path))
    assert " 24 " in (tmp_path / "00001_lr.hea").read_text()
    slow, fs2 = read_record(tmp_path / "00001_lr")
    assert fs == fs2 == 100
    np.testing.assert_allclose(slow, fast, atol=1e-6)


def test_parallel_and_serial_reads_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_MIN_RECORDS_FOR_POOL", 10)
    ptbxl.prepare(PTBXL, tmp_path / "pool", num_workers=2)
    ptbxl.prepare(PTBXL, tmp_path / "serial", num_workers=1)
    assert hashes(tmp_path / "pool") == hashes(tmp_path / "serial")


def test_manifest_literal_types(ptbxl_sample_shards):
    m = json.loads((ptbxl_sample_shards / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dataset"] == "ptbxl" and m["task"] == "superdiagnostic"
    assert m["rejected"]["file"] == "rejected.csv" and (ptbxl_sample_shards / "rejected.csv").is_file()
    assert set(m["files"]) == {f"{s}_{k}.npy" for s in ("train", "val", "test")
                               for k in ("signals", "labels", "record_ids", "folds")} | {"rejected.csv"}
    assert len(m["preprocessing"]["standardization"]["mean"]) == 12
    assert m["preprocessing"]["resampled_from"] is None and m["num_samples"] == 1000


# --------------------------------------------------------------------------- silent cases made loud

def test_ptbxl_duplicated_ecg_id_is_a_run_error(tmp_path):
    src = copy_ptbxl(tmp_path / "src", ids=range(1, 30))
    db = pd.read_csv(src / "ptbxl_database.csv")
    pd.concat([db, db[db.ecg_id == 7]]).to_csv(src / "ptbxl_database.csv", index=False)
    with pytest.raises(DataPrepError, match=r"ptbxl_database.csv: ecg_id 7 occur\(s\) in more than one row"):
        ptbxl.prepare(src, tmp_path / "o")


def test_ptbxl_fold_in_no_split_is_listed_and_counted(tmp_path, capsys):
    src = copy_ptbxl(tmp_path / "src")
    db = pd.read_csv(src / "ptbxl_database.csv")
    db.loc[db.ecg_id == 1, "strat_fold"] = 11
    db.to_csv(src / "ptbxl_database.csv", index=False)
    m = ptbxl.main(["ptbxl", f"--src={src}", f"--out={tmp_path / 'o'}"])
    assert m["unassigned_records"] == 1
    assert "fold 11 is in no split (train [1, 2, 3, 4, 5, 6, 7, 8], val [9], test [10])" in read_rejected(
        tmp_path / "o" / "rejected.csv")["1"]
    assert "in no split (fold outside --train/val/test_folds): 1" in capsys.readouterr().out


def test_ptbxl_truncated_database_table_is_refused_and_missing_rows_are_reported(tmp_path, capsys):
    src = copy_ptbxl(tmp_path / "src")
    table = src / "ptbxl_database.csv"
    full = table.read_bytes()
    table.write_bytes(full[: len(full) // 2])  # cut mid-row, as an interrupted copy leaves it
    with pytest.raises(DataPrepError, match=r"ptbxl_database.csv ends in the middle of a row .* truncated"):
        ptbxl.prepare(src, tmp_path / "o")
    # Cut at a row boundary it parses: the records on disk without a row are named.
    rows = full.decode().splitlines(keepends=True)
    table.write_text("".join(rows[:43]))
    m = ptbxl.main(["ptbxl", f"--src={src}", f"--out={tmp_path / 'o'}"])
    assert m["records_without_row"] == 100 - 42
    out = capsys.readouterr()
    assert "58 record(s) under" in out.err and "no row in ptbxl_database.csv" in out.err
    assert "WARNING: 58 record(s) on disk have no row in the label table" in out.out


def test_cpsc_non_integer_class_and_missing_record_inside_the_copy_are_rejections(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "cpsc2018", src)
    ref = (src / "REFERENCE.csv").read_text().replace("A1982,3,,", "A1982,2.5,,")
    (src / "REFERENCE.csv").write_text(ref)
    (src / "A1984.mat").unlink()  # between A1983 and A1985: lost from this copy
    m = cpsc2018.prepare(src, tmp_path / "o", max_rejected_fraction=1.0, num_folds=1,
                         split_folds={"train": [1], "val": [], "test": []})
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "unknown class code(s) ['2.5']" in rejected["A1982"]
    assert "row in REFERENCE.csv but no A1984.mat" in rejected["A1984"]
    assert m["rejected"]["counted"] == 2  # rows of records outside A1980-A1989 are listed only
    with pytest.raises(DataPrepError, match=r"2 of \d+ records .* rejected"):
        cpsc2018.prepare(src, tmp_path / "p")


def _cinc_copy(tmp_path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "cinc", src)
    return src


def test_cinc_wrong_sampling_rate_is_rejected_unless_expected(tmp_path):
    src = _cinc_copy(tmp_path)
    edit_header(src / "E00001", lambda ls: [set_field(ls[0], 2, 250)] + ls[1:])
    result = subprocess.run([sys.executable, "-m", "data_prep.cinc", f"--src={src}", f"--out={tmp_path / 'o'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "E00001: wrong sampling rate 250 Hz (expected 500 Hz)" in read_rejected(tmp_path / "o.rejected.csv")["E00001"]
    cinc.prepare(src, tmp_path / "p", max_rejected_fraction=0.2)
    assert "wrong sampling rate 250 Hz" in read_rejected(tmp_path / "p" / "rejected.csv")["E00001"]
    m = cinc.prepare(src, tmp_path / "q", expected_fs=None)  # mixed-rate folders: resampled
    assert "E00001" not in read_rejected(tmp_path / "q" / "rejected.csv")
    assert m["preprocessing"]["source_sampling_rates"] == [250, 500]


def test_cinc_signal_without_header_and_unknown_codes_are_rejections(tmp_path):
    src = _cinc_copy(tmp_path)
    (src / "E00002.hea").unlink()
    edit_header(src / "JS00001", lambda ls: [l.replace("#Dx: 164889003", "#Dx: 999999999") for l in ls])
    m = cinc.prepare(src, tmp_path / "o", max_rejected_fraction=0.5)
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "E00002.mat has no header E00002.hea beside it (not a record; listed, not counted)" in rejected["E00002"]
    assert "unknown SNOMED code(s) ['999999999']" in rejected["JS00001"]
    assert m["rejected"]["counted"] == 1 and "999999999" not in m["label_names"]
    m = cinc.prepare(src, tmp_path / "p", max_rejected_fraction=0.5, allow_unknown_codes=True)
    assert "999999999" in m["label_names"]


def test_cinc_records_without_a_mapped_code_are_listed_with_their_codes(tmp_path):
    mapping = tmp_path / "scored.csv"
    mapping.write_text("Dx,SNOMEDCTCode,Abbreviation\nsinus rhythm,426783006,NSR\n")
    m = cinc.prepare(SAMPLES / "cinc", tmp_path / "o", mapping=mapping)
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "none of its codes ['59118001'] is in scored.csv" in rejected["A0001"]
    assert m["dropped_no_label"] == len(rejected) and m["rejected"]["counted"] == 0


def test_leads_in_another_header_order_are_reordered_and_counted(tmp_path, capsys):
    src = _cinc_copy(tmp_path)
    # The names of the first two columns swapped (each line keeps its column's checksum).
    edit_header(src / "A0001", lambda ls: [ls[0], ls[1].rsplit(" ", 1)[0] + " II", ls[2].rsplit(" ", 1)[0] + " I",
                                           *ls[3:]])
    m = cinc.main(["cinc", f"--src={src}", f"--out={tmp_path / 'o'}"])
    assert m["leads_reordered"] == 1
    assert "reordered by name: 1" in capsys.readouterr().out
    from data_prep.wfdb_io import read_record

    swapped, _ = read_record(src / "A0001")
    original, _ = read_record(SAMPLES / "cinc" / "A0001")
    np.testing.assert_array_equal(swapped[:, 2:], original[:, 2:])
    np.testing.assert_array_equal(swapped[:, :2], original[:, [1, 0]])  # the data columns really are swapped


def test_the_cpsc_sample_trains_and_evaluates_with_its_documented_folds(tmp_path):
    """data_prep/samples/README.md: 10 records, 5 folds (train 1-3, val 4, test 5)."""
    from experiments.configs import teacher as teacher_config
    from mvkt import evaluate, train

    out = tmp_path / "cpsc"
    cpsc2018.main(["cpsc2018", f"--src={SAMPLES / 'cpsc2018'}", f"--out={out}", "--num_folds=5",
                   "--train_folds=1,2,3", "--val_folds=4", "--test_folds=5"])
    sizes = {s: len(data_lib.open_split(out, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 2}
    config = teacher_config.get_config()
    config.data.dir = str(out)
    config.student.width_mult = config.teacher.width_mult = 0.25
    config.train.batch_size = 2
    config.train.epochs = 1
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
    result = evaluate.evaluate_run(tmp_path / "run", split="test", n_resamples=20)
    assert np.isfinite(result["macro_auc"]) and "challenge_f_beta2" in result
