"""Sliding-window inference over whole records, including variable-length CPSC 2018 records."""

import jax
import jax.numpy as jnp
import numpy as np

from data_prep import cpsc2018
from mvkt import data as data_lib
from mvkt import inference, metrics, models
from mvkt import parallel as parallel_lib


def test_predict_records_is_max_over_windows_on_ragged_real_records(samples_dir, tmp_path):
    # Every record in "train" so that all six real CPSC records (10-19 s) are scored.
    out = tmp_path / "cpsc"
    cpsc2018.prepare(
        samples_dir / "cpsc2018", out, split_folds={"train": list(range(1, 11)), "val": [], "test": []}
    )
    split = data_lib.open_split(out, "train")
    assert split.ragged and len(set(split.lengths.tolist())) > 1
    model = models.create_model("resnet1d_wang", num_classes=split.num_classes, width_mult=0.25)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 250, 1)), train=False)
    parallel = parallel_lib.make_parallelism()
    forward = inference.make_forward_fn(model, data_lib.lead_indices(["II"]), parallel)
    window, stride = 250, 125

    scores = inference.predict_records(
        forward,
        variables,
        split,
        window=window,
        stride=stride,
        batch_size=8,
        parallel=parallel,
        aggregate="max",
    )

    assert scores.shape == (len(split), split.num_classes)
    records, starts = [], []
    for i in range(len(split)):
        s = metrics.window_starts(length=int(split.lengths[i]), window=window, stride=stride)
        assert s[-1] + window == split.lengths[i]  # the record's end is covered
        records += [i] * len(s)
        starts += list(s)
    crops = split.select_leads(["II"]).crop(records, starts, window)
    logits, _ = jax.jit(lambda x: model.apply(variables, x, train=False))(jnp.asarray(crops))
    probs = np.asarray(jax.nn.sigmoid(logits))
    for i in range(len(split)):
        expected = probs[np.asarray(records) == i].max(axis=0)
        np.testing.assert_allclose(scores[i], expected, rtol=1e-5, atol=1e-6)
    # Windows cut once and kept on the devices (a training run's validation) score the same, bit for bit.
    prepared = inference.prepare_windows(split, window=window, stride=stride, batch_size=8, parallel=parallel)
    assert prepared.nbytes == inference.window_bytes(split, window=window, stride=stride, batch_size=8)
    for aggregate in ("max", "mean"):
        np.testing.assert_array_equal(
            inference.predict_prepared(forward, variables, prepared, aggregate=aggregate),
            inference.predict_records(forward, variables, split, window=window, stride=stride, batch_size=8,
                                      parallel=parallel, aggregate=aggregate))
