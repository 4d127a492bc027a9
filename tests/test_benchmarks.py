"""The benchmark scripts' own logic (no timing is asserted anywhere: timings live in benchmarks/)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

import numpy as np

from benchmarks import conv_formulations, gpu_check, harness, profile_step, train_step


def test_profile_classifies_the_compiled_ops_of_a_conv_gradient():
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1,), [(2, 2)], dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(jax.nn.relu(y) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.ones((5, 4, 8)), jnp.ones((2, 50, 4))).compile()
    table = profile_step.hlo_instructions(compiled.as_text())
    kinds = {name: profile_step.category(name, entry) for name, entry in table.items()}
    convs = [n for n, e in table.items() if e["opcode"] == "convolution"]
    # forward, input gradient (window 5, output as long as the input), weight gradient (window 50)
    assert sorted(kinds[n] for n in convs) == ["convolution fwd", "convolution input gradient",
                                               "convolution weight gradient"]
    assert {table[n]["window"] for n in convs if kinds[n] == "convolution weight gradient"} == {50}
    assert profile_step.category("transpose_copy_fusion.3", {"opcode": "fusion", "op_name": "", "root": "copy"}) \
        == "transpose/copy"
    assert profile_step.category("reduce_fusion", {"opcode": "fusion", "op_name": "", "root": "reduce"}) == "reduction"
    assert profile_step.category("conv.1", {"opcode": "convolution", "op_name": "jit(f)/transpose(jvp(f))/conv",
                                            "shape": "f32[2,50,4]{2,1,0}", "window": 5}) == "convolution input gradient"


def test_benchmark_table_marks_busy_rows_and_gives_the_share_of_peak():
    row = {"arch": "resnet1d_wang", "config": "teacher_bce", "platform": "cpu", "busy": True,
           "load_average_start": (3.2, 1, 1), "load_average_end": (3.4, 1, 1), "ratio": 0.9,
           "other_processes_cpu_cores": 1.1,
           "jax": {"samples_per_s": 450.0, "share_of_peak": 0.81, "peak_mb": 600.0, "trace_s": 1.0, "compile_s": 2.0},
           "torch": {"samples_per_s": 500.0, "share_of_peak": 0.9, "peak_mb": 700.0}}
    table = train_step.speed_table([row], None, matmul_gflops=170.0)
    assert "3.20 -> 3.40, others 1.10 cores BUSY" in table and "| 81% | 90% |" in table and "170 GFLOP/s" in table
    assert "do not publish" in table


def test_step_flops_count_the_convolutions_of_forward_and_weight_gradient():
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(y ** 2)

    lowered = jax.jit(jax.grad(loss)).lower(jnp.ones((5, 16, 32)), jnp.ones((8, 100, 16)))
    forward = 2 * 8 * 100 * 16 * 32 * 5  # multiply-adds of one convolution
    flops = harness.step_flops(lowered, lowered.compile())
    assert flops is not None and abs(flops / (2 * forward) - 1) < 0.05  # forward + weight gradient


def test_the_memory_bank_size_and_the_trim_reach_both_workers():
    labels, batches = harness.make_data(batch_size=16, crop=8, num_batches=3, num_records=17_400)
    assert labels.shape == (17_400, harness.NUM_CLASSES)
    for b in batches:
        assert len(set(b["index"].tolist())) == 16 and b["index"].max() < 17_400
        np.testing.assert_array_equal(b["y"], labels[b["index"]])
    args = types.SimpleNamespace(batch_size=128, crop=250, warmup=2, num_batches=4, total_steps=10,
                                 torch_device="cpu", precision="float32", num_records=17_400, trim=False)
    worker_args = train_step._worker_args(args, "resnet1d_wang", "mvkt_memory_bank")
    assert "--num_records=17400" in worker_args and "--trim=False" in worker_args


def test_the_gpu_check_sees_the_cpu_kernels_only_where_they_apply():
    from mvkt import cpu_conv

    on_cpu = gpu_check.cpu_kernels_in_loss("xresnet1d50", width_mult=0.25, crop=64)
    assert on_cpu["pointwise"] > 0 and on_cpu["strided"] > 0 and on_cpu["materialized"] > 0, on_cpu
    cpu_conv.set_enabled(False)  # what a GPU backend gives: XLA's own convolutions
    try:
        assert set(gpu_check.cpu_kernels_in_loss("xresnet1d50", width_mult=0.25, crop=64).values()) == {0}
    finally:
        cpu_conv.set_enabled(None)


def test_dispatch_call_medians_leave_out_each_programs_first_call():
    from benchmarks import dispatch_calls

    calls = {"dispatch": [(9.0, 10), (0.002, 10), (0.004, 10), (0.003, 10), (5.0, 1), (0.001, 1)],
             "produce": [(0.02, 10), (0.03, 10), (0.001, 1)]}
    row = dispatch_calls.summarise(calls, 10)
    assert row["dispatch"]["calls"] == 3 and abs(row["dispatch"]["median_ms_per_call"] - 3.0) < 1e-9
    assert abs(row["dispatch"]["median_us_per_step"] - 300.0) < 1e-6
    assert row["produce"]["calls"] == 2 and abs(row["produce"]["median_us_per_step"] - 2500.0) < 1e-6


def test_a_memory_bank_smaller_than_a_batch_is_refused_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "benchmarks/train_step.py", "--num_records=100", "--no_torch",
                           f"--out={out}"], cwd=harness.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--num_records=100 is below --batch_size=128" in done.stderr
    assert not out.exists()


def test_busy_load_scales_with_the_cores(monkeypatch):
    monkeypatch.setattr(harness, "num_cores", lambda: 2)
    assert harness.busy_load() == 1.5  # the 2-core CI machine: the threshold
    monkeypatch.setattr(harness, "num_cores", lambda: 16)
    assert harness.busy_load() == 12.0


def test_every_conv_formulation_has_the_gradients_of_xla_convolution():
    """The formulations the benchmark times compute the same forward and gradients as
    lax.conv_general_dilated, for odd kernels, stride 2 and kernel 1 (as a dot)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 20, 4)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((k, 4, 4)) * 0.3, jnp.float32) for k in (7, 5, 3, 1)]
    reference = conv_formulations.step_fn(conv_formulations.conv_lax)(ws, x)
    for name, conv in conv_formulations.FORMULATIONS.items():
        value, grads = conv_formulations.step_fn(conv)(ws, x)
        np.testing.assert_allclose(value, reference[0], rtol=1e-5, err_msg=name)
        for g, r in zip(grads, reference[1]):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))), err_msg=name)
    pw = jnp.asarray(rng.standard_normal((1, 4, 6)), jnp.float32)
    conv = conv_formulations.pointwise_step(conv_formulations.conv_lax)(x, pw)
    dot = conv_formulations.pointwise_step(conv_formulations.pointwise_dot)(x, pw)
    np.testing.assert_allclose(dot[0], conv[0], rtol=1e-5)
    for g, r in zip(dot[1], conv[1]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_weight_gradient_kernels_compute_the_same_kernel_one_gradient():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 10, 4)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 10, 6)), jnp.float32)
    fns, args, flops = conv_formulations.weight_gradient_kernels(x, dy)
    results = [fns[name](*args[name]) for name in fns]
    np.testing.assert_allclose(results[1][0], results[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[3], results[2], rtol=1e-5, atol=1e-5)
    assert results[0].shape == (5, 4, 6) and list(flops.values())[0] == 5 * list(flops.values())[1]


def test_strided_input_gradient_rows_time_what_they_name():
    """The strided-input-gradient table: both input gradients of each stage agree (the
    function checks it), the polyphase row runs mvkt's formulation, and lengths halve."""
    fns, args, flops = conv_formulations.strided_input_gradients(np.random.default_rng(2), 3, 21, 4)
    names = list(fns)
    assert len(names) == 6 and names[0].startswith("stage 1 (21 -> 11)") and names[3].startswith("stage 2 (11 -> 6)")
    dx = fns[names[2]](*args[names[2]])
    assert dx.shape == (3, 21, 4) and all(v > 0 for v in flops.values())


def test_fused_weight_gradient_rows_compute_the_same_gradient():
    fns, args = conv_formulations.fused_input_weight_gradients(np.random.default_rng(3), 3, 12, 4)
    a, b = (fns[n](*args[n]) for n in fns)
    assert a.shape == (5, 4, 4)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_a_tiled_ptbxl_copy_prepares_to_that_many_patient_disjoint_records(samples_dir, tmp_path):
    from benchmarks.data_prep import tile_ptbxl
    from data_prep import ptbxl

    source = tile_ptbxl(samples_dir / "ptbxl", tmp_path / "tiled", 250)
    assert tile_ptbxl(samples_dir / "ptbxl", tmp_path / "tiled", 250) == source  # kept, not rewritten
    manifest = ptbxl.prepare(source, tmp_path / "shards")  # refuses splits that share a patient
    written = sum(manifest["splits"][s]["num_records"] for s in ("train", "val", "test"))
    single = ptbxl.prepare(samples_dir / "ptbxl", tmp_path / "one")
    per_copy = sum(single["splits"][s]["num_records"] for s in ("train", "val", "test"))
    assert per_copy * 2 < written <= 250


def test_the_end_to_end_table_splits_a_real_runs_time(ptbxl_sample_shards, tmp_path):
    """One trivial-step run of the sample through the benchmark's own subprocess path (the
    no-op step, whose calls are host work alone)."""
    import types

    from benchmarks import end_to_end
    from helpers import TINY_NET_FLAGS

    args = types.SimpleNamespace(work=str(tmp_path), settle_s=0.0, timeout_s=300)
    workload = end_to_end.Workload("sample_trivial_k4", "teacher", "subset", (
        "--config.train.epochs=2", "--config.train.batch_size=32", "--config.train.steps_per_dispatch=4",
        *TINY_NET_FLAGS), trivial=True, noop=True, isolated=None)
    row = end_to_end._run(args, workload, ptbxl_sample_shards, {})
    assert row["steps"] == 4 and row["steps_per_dispatch"] == 4 and row["training_data"] == "devices"
    assert row["job_wall_s"] > row["startup_s"] > 0
    assert {"compile", "dispatch", "validation", "checkpointing"} <= set(row["phases_s"])
    assert row["host_s_per_step"] > 0 and row["trivial"] and row["noop"]
    table = end_to_end.table([row])
    assert "sample_trivial_k4" in table and table.count("\n") == 2
    assert f"| {row['host_s_per_step'] * 1e6:.0f} |" in table  # host us/step: shown for trivial rows only


def test_the_memory_breakdown_measures_the_step_and_what_the_trim_returns():
    from benchmarks import memory

    row = memory.jax_row("fcn_wang", "teacher_bce", True, batch_size=32)
    untrimmed = memory.jax_row("fcn_wang", "teacher_bce", False, batch_size=32)
    # What the step needs while it runs is XLA's own count of its temporaries (measured 1.03-1.15x).
    assert 0.8 < row["step_working_mb"] / row["xla"]["temp_size_in_bytes"] < 1.5, row
    assert row["step_program_mb"]["anon"] > 5 and row["programs_freed_mb"]["anon"] > 5, row
    # Without malloc_trim the compiler's freed heap stays resident (measured 384 against 138 MB).
    assert untrimmed["held_before_steps_mb"] > row["held_before_steps_mb"] + 100, (untrimmed, row)
    assert untrimmed["peak_during_steps_mb"] > row["peak_during_steps_mb"] + 100, (untrimmed, row)
    table = memory.table([{"arch": "fcn_wang", "config": "teacher_bce", "jax": row, "jax_no_trim": untrimmed,
                           "load_average_start": 0.5, "load_average_end": 1.0, "busy": False}])
    assert "| fcn_wang | teacher_bce |" in table and table.count("\n") == 2
