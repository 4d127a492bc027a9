"""mvkt.data: open_split, lead selection, crops (fixed and ragged), verify_shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep import cpsc2018
from mvkt import data as data_lib


@pytest.fixture(scope="module")
def cpsc_shards(tmp_path_factory, samples_dir):
    """Ragged shards of the six CPSC 2018 sample records (100 Hz)."""
    out = tmp_path_factory.mktemp("cpsc") / "shards"
    cpsc2018.prepare(samples_dir / "cpsc2018", out)
    return out


def test_open_split_fixed(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    assert len(split) == 67 and split.num_classes == 5 and split.leads == list(data_lib.LEADS)
    assert isinstance(split.x, np.memmap) and split.x.shape == (67, 1000, 12)
    assert split.y.dtype == np.uint8 and split.folds.dtype == np.int16 and split.record_ids.dtype.kind == "U"
    assert split.lengths.tolist() == [1000] * 67 and split.sampling_rate == 100
    np.testing.assert_array_equal(split.record(5), split.x[5])


def test_select_leads(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "val")
    view = split.select_leads(["V1", "I", "aVR"])
    assert view.leads == ["V1", "I", "aVR"] and view.lead_idx == [6, 0, 3] and len(view) == len(split)
    full = split.crop([0, 3], [100, 200], 250)
    np.testing.assert_array_equal(view.crop([0, 3], [100, 200], 250), full[:, :, [6, 0, 3]])
    np.testing.assert_array_equal(view.record(2), split.record(2)[:, [6, 0, 3]])
    assert split.leads == list(data_lib.LEADS)  # the original split is unchanged
    single = split.select_leads(["I"])
    assert single.crop([1], [0], 10).shape == (1, 10, 1)
    with pytest.raises(ValueError, match=r"unknown lead name\(s\) \['AVR', 'V7'\]"):
        split.select_leads(["AVR", "V7"])
    with pytest.raises(ValueError, match="unknown lead"):
        data_lib.lead_indices(["lead1"])
    assert data_lib.lead_indices(["II"]) == [1]


def test_crop_fixed_zero_pads_past_the_end(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "test")
    batch = split.crop(np.array([0, 1]), np.array([0, 900]), 250)
    assert batch.shape == (2, 250, 12) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], split.x[0, :250])
    np.testing.assert_array_equal(batch[1, :100], split.x[1, 900:])
    assert not batch[1, 100:].any()
    with pytest.raises(IndexError):
        split.crop([len(split)], [0], 10)
    with pytest.raises(ValueError, match="starts"):
        split.crop([0], [-1], 10)


def test_ragged_split_and_crop(cpsc_shards):
    split = data_lib.open_split(cpsc_shards, "train")
    assert split.ragged and isinstance(split.x, data_lib.RaggedSignals)
    lengths = split.lengths
    assert len(set(lengths.tolist())) > 1  # the sample records have different durations
    assert split.x.data.shape == (lengths.sum(), 12) and split.x.offsets[-1] == lengths.sum()
    for i in range(len(split)):
        assert split.record(i).shape == (lengths[i], 12)
    i = int(np.argmin(lengths))
    n = int(lengths[i])
    batch = split.crop([i, i], [n - 30, 0], n + 50)
    np.testing.assert_array_equal(batch[0, :30], split.record(i)[n - 30:])
    assert not batch[0, 30:].any()
    np.testing.assert_array_equal(batch[1, :n], split.record(i))
    assert not batch[1, n:].any()
    lead_ii = split.select_leads(["II"])
    np.testing.assert_array_equal(lead_ii.crop([i], [5], 40)[0, :, 0], split.record(i)[5:45, 1])


def test_verify_shards_detects_changes(ptbxl_sample_shards, tmp_path):
    assert data_lib.verify_shards(ptbxl_sample_shards) == 13
    copy = tmp_path / "copy"
    shutil.copytree(ptbxl_sample_shards, copy)
    sig = copy / "val_signals.npy"
    raw = bytearray(sig.read_bytes())
    raw[-3] ^= 0xFF
    sig.write_bytes(bytes(raw))
    (copy / "test_folds.npy").unlink()
    with pytest.raises(data_lib.ShardError, match=r"2 file\(s\).*test_folds.npy: missing.*val_signals.npy: sha256"):
        data_lib.verify_shards(copy)


def test_open_split_validates_manifest_and_sizes(ptbxl_sample_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ptbxl_sample_shards, copy)
    np.save(copy / "train_labels.npy", np.zeros((3, 5), np.uint8))
    with pytest.raises(data_lib.ShardError, match=r"labels \(3, 5\) uint8, manifest says \(67, 5\)"):
        data_lib.open_split(copy, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        data_lib.open_split(copy, "validation")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data_lib.ShardError, match="format_version 2"):
        data_lib.open_split(copy, "val")
    with pytest.raises(data_lib.ShardError, match="not a data_prep output folder"):
        data_lib.open_split(tmp_path, "train")


def test_batches_by_step_are_the_same_drawn_in_any_order_and_from_threads(ptbxl_sample_shards):
    """The epoch's record order is drawn once and kept (the prefetch threads ask for steps of two
    epochs at once): every step's batch is still the pure function of (seed, step)."""
    import concurrent.futures

    from mvkt import input_pipeline

    def loader():
        return input_pipeline.TrainBatches(data_lib.open_split(ptbxl_sample_shards, "train"), global_batch_size=16,
                                           crop_length=250, random_crop=True, seed=7)

    def by_hand(batches, step):  # the draw without any kept state
        epoch, position = divmod(step, batches.steps_per_epoch)
        order = np.random.default_rng([7, epoch]).permutation(len(batches.split))
        return order[position * 16:(position + 1) * 16]

    steps = list(range(4 * 5)) + [3, 0, 17, 2, 19, 4]  # 4 steps per epoch; epochs revisited
    in_order = loader()
    expected = {s: by_hand(in_order, s) for s in steps}
    for s in steps:
        np.testing.assert_array_equal(in_order.indices_at(s)[0], expected[s])
    threaded = loader()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: threaded.indices_at(s), steps[::-1] * 3))
    for s, (indices, starts) in zip(steps[::-1] * 3, got):
        np.testing.assert_array_equal(indices, expected[s])
        np.testing.assert_array_equal(starts, in_order.indices_at(s)[1])
    assert len(threaded._orders) <= 2  # kept for two epochs at most
