"""What every benchmark here shares: the synthetic workload and the one way its JAX step is
built, process memory probes, the stdin/JSON worker protocol, the load probes and the wait
for a quiet machine, and the environment record written beside every table.

The coordinator of a benchmark starts one worker process per measured thing (so each
process's peak RSS belongs to it alone) with ``Worker``; a worker prints ``emit``ted JSON
lines behind ``MARK`` and answers ``run N`` / ``done`` on stdin (``serve``).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
NUM_LEADS = 12
NUM_RECORDS = 1442  # train split of ptbxl-subset-1819: rows of the CLT memory bank
MARK = "@@BENCH "
# Rows starting above this 1-minute load average per core (1.5 on the 2-core CI machine) are marked
# and not published; on a GPU machine the JAX worker's host thread alone adds about 1.
BUSY_LOAD_PER_CORE = 0.75
BUSY_OTHER_CORES = 0.25  # ... and rows during which other processes used more than this many cores


CONFIGS: dict[str, tuple[str, str, str | None, bool]] = {
    "teacher_bce": ("bce", "all", None, False),
    "student_bce": ("bce", "I", None, False),
    "mvkt_memory_bank": ("mvkt", "I", "memory_bank", False),
    "mvkt_memory_bank_cache": ("mvkt", "I", "memory_bank", True),
    "mvkt_in_batch": ("mvkt", "I", "in_batch", False),
    "mvkt_in_batch_cache": ("mvkt", "I", "in_batch", True),
}


# ----------------------------------------------------------------------------- process memory


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = status_kb("VmRSS")
    if kb is None:  # not Linux: ru_maxrss is the best we have
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def hwm_mb() -> float:
    kb = status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- synthetic workload


def make_data(*, batch_size: int, crop: int, num_batches: int, seed: int = 0, num_records: int = NUM_RECORDS):
    """Deterministic synthetic batches shared by both frameworks (NumPy, channels-last x).

    Labels of all ``num_records`` records (multi-hot, p=0.3; the rows of the CLT memory bank),
    and per batch distinct record indices whose labels are the batch labels, as the real loader
    produces.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = (rng.random((num_records, NUM_CLASSES)) < 0.3).astype(np.float32)
    batches = []
    for _ in range(num_batches):
        index = rng.permutation(num_records)[:batch_size].astype(np.int32)
        x = rng.standard_normal((batch_size, crop, NUM_LEADS)).astype(np.float32)
        batches.append({"x": x, "y": labels[index], "index": index})
    return labels, batches


def add_teacher_cache(batches, *, feature_dim: int, seed: int = 1):
    """Precomputed teacher outputs as `mvkt.teachers.teacher_cache` gives them (fixed crops or the
    grid of random-crop starts: the step sees the same arrays; values do not matter for speed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for b in batches:
        n = b["x"].shape[0]
        b["teacher_logits"] = rng.standard_normal((n, NUM_CLASSES)).astype(np.float32)
        # Pooled features are concat(max, mean) of ReLU activations: non-negative.
        b["teacher_features"] = np.abs(rng.standard_normal((n, feature_dim))).astype(np.float32)
    return batches


def build_step(arch: str, config: str, *, batch_size: int, crop: int, num_batches: int, total_steps: int,
               precision: str = "float32", num_records: int = NUM_RECORDS) -> dict:
    """The JAX side of a row, exactly as ``mvkt.train`` builds it: ``training`` (state and
    jitted step from ``mvkt.step.build_training``), the frozen ``teacher`` or None, the
    synthetic ``labels`` and ``host_batches``, ``batches`` on the mesh, ``rng`` and ``parallel``."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import default
    from mvkt import models, parallel
    from mvkt import step as step_lib

    method, leads, variant, cache = CONFIGS[config]
    cfg = default.get_config()
    cfg.method = method
    cfg.student.arch = arch
    cfg.student.leads = leads
    cfg.train.batch_size = batch_size
    cfg.student.dtype = precision  # bfloat16: the opt-in mixed precision (float32 parameters)
    if variant is not None:
        cfg.clt.variant = variant
    spec = step_lib.LossSpec.from_config(cfg)
    par = parallel.make_parallelism()
    teacher = None
    if spec.needs_teacher:
        teacher_model = models.create_model(arch, num_classes=NUM_CLASSES, dtype=jnp.dtype(precision))
        # Jitted, as a trained teacher is not initialised op by op (its checkpoint is read): eager
        # init would leave one compiled program per operation in this process's memory.
        init = jax.jit(functools.partial(teacher_model.init, train=False))
        teacher = (teacher_model, init(jax.random.PRNGKey(1), jnp.zeros((1, crop, NUM_LEADS))))
    labels, host_batches = make_data(batch_size=batch_size, crop=crop, num_batches=num_batches,
                                     num_records=num_records)
    if cache:
        add_teacher_cache(host_batches, feature_dim=models.feature_dim(arch))
    training = step_lib.build_training(
        cfg, num_classes=NUM_CLASSES, crop_length=crop, total_steps=total_steps, parallel=par,
        rng=jax.random.PRNGKey(0), train_labels=labels, teacher=teacher)
    return {"training": training, "teacher": teacher, "labels": labels, "host_batches": host_batches,
            "batches": [par.to_global(b) for b in host_batches], "rng": par.replicate(jax.random.PRNGKey(5)),
            "parallel": par}


# ----------------------------------------------------------------------------- worker protocol


def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(run_steps, finish) -> None:
    """Worker loop: 'run N' -> time N steps; 'done' -> report memory and exit."""
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            seconds = run_steps(int(cmd[1]))
            emit({"event": "round", "seconds": seconds})
        elif cmd[0] == "done":
            emit({"event": "done", **finish()})
            return


def flax_param_shapes(params) -> list[tuple[int, ...]]:
    """Parameter shapes in PyTorch's layout (conv (k, in, out) -> (out, in, k), dense (in, out) -> (out, in))."""
    import jax

    shapes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(leaf.shape)
        if getattr(path[-1], "key", None) == "kernel":
            shape = (shape[-1], shape[-2], shape[0]) if len(shape) == 3 else (shape[1], shape[0])
        shapes.append(shape)
    return sorted(shapes)


def step_flops(lowered, compiled) -> float | None:
    """Floating-point operations of one step by XLA's cost model.

    On CPU from the compiled module, what actually runs: the HLO before optimisation counted
    work the compiler removes (the MVKT memory-bank step at 17,400 bank rows: 105 GFLOP before,
    66 after, 64 for both at 1,442 rows, with the same step time), which read as 106% of the
    matmul rate. On GPU from the HLO before backend passes: there the compiled module hides the
    convolutions in cuDNN custom calls, which its cost analysis does not count (it gave 4% of
    the step's FLOPs on an H100).
    """
    import jax

    sources = (compiled, lowered) if jax.default_backend() == "cpu" else (lowered, compiled)
    for source in sources:
        try:
            analysis = source.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            flops = float(analysis.get("flops", 0.0))
        except Exception:  # noqa: BLE001 - not every backend reports it
            continue
        if flops:
            return flops
    return None


class Worker:
    """A worker process: ``script --worker=KIND *args``, its stderr in a temporary log that
    is shown when it dies."""

    def __init__(self, kind: str, script: str | pathlib.Path, args: list[str], env: dict | None = None):
        self.kind = kind
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_{kind}_", suffix=".log", delete=False)
        cmd = [sys.executable, "-u", str(pathlib.Path(script).resolve()), f"--worker={kind}", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=str(ROOT), env={**os.environ, **(env or {})})

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self.log.flush()
        tail = pathlib.Path(self.log.name).read_text()[-3000:]
        raise RuntimeError(f"{self.kind} worker exited with {self.proc.returncode}; log {self.log.name}:\n{tail}")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


# ----------------------------------------------------------------------------- machine and load


def torch_version() -> str | None:
    try:
        from importlib import metadata
        return metadata.version("torch")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used (every core), from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def busy_load() -> float:
    return BUSY_LOAD_PER_CORE * num_cores()


def wait_for_quiet(limit_s: float, max_load: float | None = None) -> None:
    """Lets the 1-minute load average fall below ``max_load`` (default: two thirds of the busy
    load) after the previous row (its own load) before a row starts; ``limit_s`` at most."""
    deadline = time.perf_counter() + limit_s
    threshold = busy_load() / 1.5 if max_load is None else max_load
    while os.getloadavg()[0] > threshold and time.perf_counter() < deadline:
        time.sleep(5)


def environment(**extra) -> dict:
    """The record of where a table was measured, written into every benchmark's JSON."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cpu_affinity": num_cores(), "cpu_model": cpu_model(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "load_average": os.getloadavg(), **extra}


# ----------------------------------------------------------------------------- flags

_DEFINED: list[str] = []


def define_flags(define: Callable[[], None]) -> None:
    """Runs a benchmark's ``define`` (absl ``flags.DEFINE_*`` calls) and remembers the names:
    each benchmark defines its flags only as the entry point, since tests import several
    benchmarks whose flags share names (--out, --steps)."""
    before = set(flags.FLAGS)
    define()
    _DEFINED[:] = sorted(set(flags.FLAGS) - before)


def flag_values() -> types.SimpleNamespace:
    """The entry point's parsed flags as one namespace (workers and rows read ``args.<flag>``)."""
    return types.SimpleNamespace(**{name: flags.FLAGS[name].value for name in _DEFINED})
