"""Train-step benchmark: mvkt's jitted JAX step vs. a PyTorch eager reference.

What is timed
-------------
For each architecture (`--archs`, default resnet1d_wang and xresnet1d50) and each
configuration below, one optimisation step on a batch of `--batch_size` 12-lead crops
of `--crop` samples with 5 classes:

| config | JAX (mvkt) | PyTorch reference |
|---|---|---|
| `teacher_bce` | method `bce`, 12 leads | 12-lead net, BCE |
| `student_bce` | method `bce`, lead I | lead-I net, BCE |
| `mvkt_memory_bank` | method `mvkt`, CLT `memory_bank` (K=1024 negatives, N=1442 records), teacher forward in the step | same, CRD memory + momentum update |
| `mvkt_memory_bank_cache` | as above, batch carries `teacher_logits`/`teacher_features` (teacher forward skipped) | same |
| `mvkt_in_batch` | method `mvkt`, CLT `in_batch`, teacher forward in the step | same, in-batch InfoNCE |
| `mvkt_in_batch_cache` | as above with the teacher cache | same |

The JAX side is exactly what `mvkt.train.train_and_evaluate` runs: the state and the
donated, jitted step from `mvkt.step.build_training` (lowered and compiled ahead of time so that compilation is timed separately; the
executable is the one `jit` builds), batches placed with `Parallelism.to_global`, the
optimizer from `make_optimizer` (clip by global norm + AdamW, one-cycle schedule) and
the losses of `mvkt.losses` with the defaults of `experiments/configs/default.py`.
Data loading is not timed (training prefetches batches in a background thread).

The PyTorch reference (eager, CPU) is a port of the same nets (same layers, widths,
kernels, paddings; parameter shapes are checked against the Flax nets before timing),
the same losses (BCE, tempered binary-KL MKD, symmetric disease-aware in-batch InfoNCE,
CRD memory-bank NCE with disease-aware negative sampling and momentum update) and
AdamW + gradient clipping + one-cycle LR, channels-first `(B, L, T)`,
`torch.set_num_threads(<cores>)`.

Method
------
Every (arch, config) gets two fresh worker processes, one JAX, one PyTorch, so that
each process's peak RSS belongs to that configuration only. Both are set up and warmed
up (JAX: lower + compile, reported as "compile s", then `--warmup` steps), then the
coordinator alternates timing rounds between them (JAX first on even rounds, PyTorch
first on odd ones; only one worker computes at a time). A round runs `--steps` steps and
blocks on the result; the step time of a framework is the median over `--repeats`
rounds of (round time / steps); samples/s = batch / median step time.

Peak memory: on CPU, the peak resident set size (VmHWM) of the worker process during
the timed rounds minus its RSS after imports and backend start, before any model or
data existed; the kernel's peak counter is reset (`/proc/self/clear_refs` = 5) after
warm-up so compilation transients are excluded (the JSON also has the peak including
compilation). Same method for both frameworks (tracemalloc would miss the native
allocations of both). Where JAX's device reports memory statistics (GPU), the JAX
column is `memory_stats()["peak_bytes_in_use"]` instead; the JSON says which.

Usage
-----
    pip install torch==2.13.0       # benchmark-only dependency (CPU wheel), not used by mvkt
    python benchmarks/train_step.py                      # full run, both archs
    python benchmarks/train_step.py --quick              # smoke check (tiny, ~1-2 min)

Without torch the JAX columns are still measured and the torch columns say why they
are empty. `--jax_env XLA_FLAGS=...` passes environment variables to the JAX workers only
(for flag experiments; recorded in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = ("resnet1d_wang", "xresnet1d50")
NUM_CLASSES = 5
NUM_LEADS = 12
NUM_RECORDS = 1442  # train split of ptbxl-subset-1819: rows of the CLT memory bank
MARK = "@@BENCH "
# Rows starting above this 1-minute load average per core (1.5 on the 2-core CI machine) are marked
# and not published; on a GPU machine the JAX worker's host thread alone adds about 1.
BUSY_LOAD_PER_CORE = 0.75
BUSY_OTHER_CORES = 0.25  # ... and rows during which other processes used more than this many cores
TORCH_INSTALL = "pip install torch==2.13.0"

# name -> (method, student leads, CLT variant, teacher cache)
CONFIGS: dict[str, tuple[str, str, str | None, bool]] = {
    "teacher_bce": ("bce", "all", None, False),
    "student_bce": ("bce", "I", None, False),
    "mvkt_memory_bank": ("mvkt", "I", "memory_bank", False),
    "mvkt_memory_bank_cache": ("mvkt", "I", "memory_bank", True),
    "mvkt_in_batch": ("mvkt", "I", "in_batch", False),
    "mvkt_in_batch_cache": ("mvkt", "I", "in_batch", True),
}


# ----------------------------------------------------------------------------- process memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: ru_maxrss is the best we have
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _hwm_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- synthetic data


def make_data(*, batch_size: int, crop: int, num_batches: int, seed: int = 0):
    """Deterministic synthetic batches shared by both frameworks (NumPy, channels-last x).

    Labels of all NUM_RECORDS records (multi-hot, p=0.3), and per batch distinct record
    indices whose labels are the batch labels, as the real loader produces.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = (rng.random((NUM_RECORDS, NUM_CLASSES)) < 0.3).astype(np.float32)
    batches = []
    for _ in range(num_batches):
        index = rng.permutation(NUM_RECORDS)[:batch_size].astype(np.int32)
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


# ----------------------------------------------------------------------------- worker protocol


def _say(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _serve(run_steps, finish) -> None:
    """Worker loop: 'run N' -> time N steps; 'done' -> report memory and exit."""
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            seconds = run_steps(int(cmd[1]))
            _say({"event": "round", "seconds": seconds})
        elif cmd[0] == "done":
            _say({"event": "done", **finish()})
            return


# ----------------------------------------------------------------------------- JAX worker


def _flax_param_shapes(params) -> list[tuple[int, ...]]:
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
    """Floating-point operations of one step by XLA's cost model, read from the HLO before backend
    passes where possible: on GPU the compiled module hides the convolutions in cuDNN custom calls,
    which its cost analysis does not count (it gave 4% of the step's FLOPs on an H100)."""
    for source in (lowered, compiled):
        try:
            analysis = source.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            flops = float(analysis.get("flops", 0.0))
        except Exception:  # noqa: BLE001 - not every backend reports it
            continue
        if flops:
            return flops
    return None


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.configs import default
    from mvkt import models, parallel
    from mvkt import step as step_lib

    device = jax.devices()[0]
    baseline_mb = _rss_mb()

    method, leads, variant, cache = CONFIGS[args.config]
    cfg = default.get_config()
    cfg.method = method
    cfg.student.arch = args.arch
    cfg.student.leads = leads
    cfg.train.batch_size = args.batch_size
    cfg.student.dtype = args.precision  # bfloat16: the opt-in mixed precision (float32 parameters)
    if variant is not None:
        cfg.clt.variant = variant
    spec = step_lib.LossSpec.from_config(cfg)

    par = parallel.make_parallelism()
    teacher = None
    feature_dim = models.feature_dim(args.arch)
    if spec.needs_teacher:
        teacher_model = models.create_model(args.arch, num_classes=NUM_CLASSES, dtype=jnp.dtype(args.precision))
        teacher = (teacher_model,
                   teacher_model.init(jax.random.PRNGKey(1), jnp.zeros((1, args.crop, NUM_LEADS)), train=False))
    labels, host_batches = make_data(batch_size=args.batch_size, crop=args.crop, num_batches=args.num_batches)
    if cache:
        add_teacher_cache(host_batches, feature_dim=feature_dim)
    training = step_lib.build_training(
        cfg, num_classes=NUM_CLASSES, crop_length=args.crop, total_steps=args.total_steps, parallel=par,
        rng=jax.random.PRNGKey(0), train_labels=labels, teacher=teacher)
    state, update = training.state, training.update
    base_rng = par.replicate(jax.random.PRNGKey(5))
    batches = [par.to_global(b) for b in host_batches]

    rss_before_compile_mb = _rss_mb() - baseline_mb
    t0 = time.perf_counter()
    lowered = update.lower(state, batches[0], base_rng)
    t1 = time.perf_counter()
    step = lowered.compile()
    t2 = time.perf_counter()
    rss_after_compile_mb = _rss_mb() - baseline_mb
    flops = step_flops(lowered, step)
    xla_memory = None
    try:  # XLA's own buffer accounting of the step executable
        ma = step.memory_analysis()
        xla_memory = {k: getattr(ma, k) / 2**20 for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass

    holder = {"state": state, "i": 0}
    del state

    def run_steps(n: int) -> float:
        if n <= 0:
            return 0.0
        s = holder["state"]
        metrics = None
        start = time.perf_counter()
        for _ in range(n):
            s, metrics = step(s, batches[holder["i"] % len(batches)], base_rng)
            holder["i"] += 1
        jax.block_until_ready((s, metrics))
        elapsed = time.perf_counter() - start
        holder["state"], holder["metrics"] = s, metrics
        return elapsed

    first_step_s = run_steps(1)
    run_steps(max(args.warmup - 1, 0))
    metrics = {k: float(v) for k, v in jax.device_get(holder["metrics"]).items()}
    peak_with_compile_mb = _hwm_mb() - baseline_mb
    peak_reset = _reset_peak()

    params = holder["state"].params
    n_model = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["model"]))
    n_heads = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["heads"]))
    n_teacher = (sum(int(np.prod(a.shape)) for a in jax.tree.leaves(teacher[1]["params"]))
                 if teacher is not None else 0)
    _say({"event": "ready", "trace_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": first_step_s,
          "warmup_metrics": metrics, "params": {"model": n_model, "heads": n_heads, "teacher": n_teacher},
          "device": device.device_kind, "platform": device.platform, "num_devices": jax.device_count(),
          "xla_memory_mb": xla_memory,
          "flops_per_step": flops,
          "rss_before_compile_mb": rss_before_compile_mb, "rss_after_compile_mb": rss_after_compile_mb})

    def finish() -> dict:
        stats = device.memory_stats()
        out = {"peak_with_compile_mb": peak_with_compile_mb, "baseline_rss_mb": baseline_mb,
               "final_loss": float(jax.device_get(holder["metrics"]["loss"]))}
        if stats and "peak_bytes_in_use" in stats:
            out["peak_mb"] = stats["peak_bytes_in_use"] / 2**20
            out["peak_method"] = "jax.devices()[0].memory_stats()['peak_bytes_in_use'] (device memory, whole process)"
        else:
            out["peak_mb"] = _hwm_mb() - baseline_mb
            out["peak_method"] = ("process peak RSS (VmHWM) during timed steps minus RSS after imports"
                                  if peak_reset else "process peak RSS (incl. compilation) minus RSS after imports")
        return out

    _serve(run_steps, finish)


# ----------------------------------------------------------------------------- PyTorch reference


def build_torch_model(arch: str, in_leads: int, num_classes: int):
    """PyTorch port of mvkt.models (same layers, widths, kernels, paddings, init); forward -> (logits, features)."""
    import torch
    from torch import nn

    def conv(ni, nf, k, stride=1):
        return nn.Conv1d(ni, nf, k, stride=stride, padding=(k - 1) // 2, bias=False)

    class Head(nn.Module):  # create_head1d(nf, nc, lin_ftrs=[128], ps=0.5) after the concat pooling
        def __init__(self, nf2, nc, hidden=128, ps=0.5):
            super().__init__()
            self.layers = nn.Sequential(nn.BatchNorm1d(nf2), nn.Dropout(ps / 2), nn.Linear(nf2, hidden), nn.ReLU(),
                                        nn.BatchNorm1d(hidden), nn.Dropout(ps), nn.Linear(hidden, nc))

        def forward(self, pooled):
            return self.layers(pooled)

    def concat_pool(x):  # AdaptiveConcatPool1d: (max, mean) over time
        return torch.cat([x.amax(dim=2), x.mean(dim=2)], dim=1)

    class BasicBlock1d(nn.Module):
        def __init__(self, ni, nf, stride, kernels=(5, 3)):
            super().__init__()
            self.conv1, self.bn1 = conv(ni, nf, kernels[0], stride), nn.BatchNorm1d(nf)
            self.conv2, self.bn2 = conv(nf, nf, kernels[1]), nn.BatchNorm1d(nf)
            self.down = None
            if stride != 1 or ni != nf:
                self.down = nn.Sequential(conv(ni, nf, 1, stride), nn.BatchNorm1d(nf))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet1dWang(nn.Module):
        def __init__(self):
            super().__init__()
            w = 128
            self.stem = nn.Sequential(conv(in_leads, w, 7), nn.BatchNorm1d(w), nn.ReLU())
            self.blocks = nn.Sequential(*[BasicBlock1d(w, w, s) for s in (1, 2, 2)])
            self.head = Head(2 * w, num_classes)

        def forward(self, x):
            features = concat_pool(self.blocks(self.stem(x)))
            return self.head(features), features

    class XResBlock(nn.Module):
        def __init__(self, expansion, ni, nh, nf, stride, k):
            super().__init__()
            if expansion == 1:
                self.convs = nn.Sequential(conv(ni, nh, k, stride), nn.BatchNorm1d(nh), nn.ReLU(),
                                           conv(nh, nf, k), nn.BatchNorm1d(nf))
            else:
                self.convs = nn.Sequential(conv(ni, nh, 1), nn.BatchNorm1d(nh), nn.ReLU(),
                                           conv(nh, nh, k, stride), nn.BatchNorm1d(nh), nn.ReLU(),
                                           conv(nh, nf, 1), nn.BatchNorm1d(nf))
            self.pool = nn.AvgPool1d(2, ceil_mode=True) if stride != 1 else None
            self.idconv = nn.Sequential(conv(ni, nf, 1), nn.BatchNorm1d(nf)) if ni != nf else None

        def forward(self, x):
            identity = x if self.pool is None else self.pool(x)
            if self.idconv is not None:
                identity = self.idconv(identity)
            return torch.relu(self.convs(x) + identity)

    class XResNet1d(nn.Module):
        def __init__(self, expansion, layers, k=5, stem=(32, 32, 64), block_width=64):
            super().__init__()
            mods, ni = [], in_leads
            for i, w in enumerate(stem):
                mods += [conv(ni, w, k, 2 if i == 0 else 1), nn.BatchNorm1d(w), nn.ReLU()]
                ni = w
            mods.append(nn.MaxPool1d(3, stride=2, padding=1))
            nh, nf = block_width, block_width * expansion
            for stage, n in enumerate(layers):
                for b in range(n):
                    mods.append(XResBlock(expansion, ni, nh, nf, 2 if (stage > 0 and b == 0) else 1, k))
                    ni = nf
            self.body = nn.Sequential(*mods)
            self.head = Head(2 * nf, num_classes)

        def forward(self, x):
            features = concat_pool(self.body(x))
            return self.head(features), features

    xresnets = {"xresnet1d18": (1, (2, 2, 2, 2)), "xresnet1d34": (1, (3, 4, 6, 3)),
                "xresnet1d50": (4, (3, 4, 6, 3)), "xresnet1d101": (4, (3, 4, 23, 3))}
    if arch == "resnet1d_wang":
        net = ResNet1dWang()
    elif arch in xresnets:
        net = XResNet1d(*xresnets[arch])
    else:
        raise ValueError(f"no PyTorch reference for {arch!r}")
    for m in net.modules():  # the benchmark's weight_init, as mvkt.models
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class TorchProjectionHead:
    """Linear(F, dim) + L2 normalisation (CRD Embed), as mvkt.models.ProjectionHead."""

    @staticmethod
    def build(feature_dim: int, dim: int):
        from torch import nn
        import torch.nn.functional as F

        class Embed(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(feature_dim, dim)

            def forward(self, f):
                return F.normalize(self.linear(f), dim=1)

        return Embed()


def torch_losses():
    """The mvkt.losses functions in PyTorch (same maths, same masking and sampling)."""
    import torch
    import torch.nn.functional as F

    def mkd(student_logits, teacher_logits, temperature):
        t = float(temperature)
        s, z = student_logits / t, teacher_logits.detach() / t
        lp_t, lq_t = F.logsigmoid(z), F.logsigmoid(-z)
        lp_s, lq_s = F.logsigmoid(s), F.logsigmoid(-s)
        kl = lp_t.exp() * (lp_t - lp_s) + lq_t.exp() * (lq_t - lq_s)
        return (t * t * kl.sum(dim=1)).mean()

    def differs(a, c):  # negative_mask(mode="differs")
        return (a.bool()[:, None, :] != c.bool()[None, :, :]).any(dim=-1)

    def in_batch(se, te, labels, temperature):
        sim = se @ te.T / temperature
        keep = differs(labels, labels) | torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        pos = sim.diagonal()

        def direction(logits):
            return torch.logsumexp(logits.masked_fill(~keep, -1e9), dim=1) - pos

        return (0.5 * (direction(sim) + direction(sim.T))).mean()

    class Bank:
        """CRD ContrastMemory with disease-aware negatives (inverse-CDF sampling as mvkt.losses)."""

        def __init__(self, labels, dim, generator):
            n = labels.shape[0]
            stdv = 1.0 / math.sqrt(dim / 3)
            device = generator.device  # memories, labels and the negative sampling live where the step runs
            self.student = torch.rand(n, dim, generator=generator, device=device) * 2 * stdv - stdv
            self.teacher = torch.rand(n, dim, generator=generator, device=device) * 2 * stdv - stdv
            labels = labels.to(device)
            self.labels = labels.bool()
            self.z_student = self.z_teacher = None
            self.generator = generator

        def loss(self, se, te, indices, labels, *, num_negatives, temperature, momentum):
            n = self.student.shape[0]
            allowed = differs(labels, self.labels)  # (B, N)
            has = allowed.any(dim=1)
            allowed = allowed | ~has[:, None]
            cum = allowed.long().cumsum(dim=1)
            n_allowed = cum[:, -1:]
            ranks = (torch.rand(labels.shape[0], num_negatives, generator=self.generator,
                                device=self.generator.device) * n_allowed).long()
            negatives = torch.searchsorted(cum, torch.minimum(ranks, n_allowed - 1) + 1)
            cand = torch.cat([indices[:, None], negatives], dim=1)  # (B, 1+K)
            log_s = torch.bmm(self.teacher[cand], se[:, :, None]).squeeze(2) / temperature
            log_t = torch.bmm(self.student[cand], te[:, :, None]).squeeze(2) / temperature
            if self.z_student is None:  # set on the first call, then constant (CRD)
                self.z_student = float(log_s.detach().exp().mean()) * n
                self.z_teacher = float(log_t.detach().exp().mean()) * n
            log_noise = math.log(num_negatives / n)
            w = has.float()

            def nce(log_scores, z):
                lp = log_scores - math.log(z)
                return F.softplus(log_noise - lp[:, 0]) + w * F.softplus(lp[:, 1:] - log_noise).sum(dim=1)

            loss = (nce(log_s, self.z_student) + nce(log_t, self.z_teacher)).mean()
            with torch.no_grad():  # momentum update of both memories
                for mem, emb in ((self.student, se), (self.teacher, te)):
                    rows = F.normalize(momentum * mem[indices] + (1 - momentum) * emb.detach(), dim=1)
                    mem.index_copy_(0, indices, rows)
            return loss

    return mkd, in_batch, Bank


def torch_param_shapes(module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters())


def torch_worker(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(_num_cores())
    device = torch.device(args.torch_device)
    on_gpu = device.type == "cuda"
    if on_gpu:  # XLA's default float32 precision on GPU lets dots and convolutions use TF32: the same here
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest algorithms once
    baseline_mb = _rss_mb()
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)

    from experiments.configs import default

    cfg = default.get_config()
    method, leads, variant, cache = CONFIGS[args.config]
    n_in = NUM_LEADS if leads == "all" else 1  # lead I is channel 0
    uses_mkd = uses_clt = method == "mvkt"
    mkd, in_batch, Bank = torch_losses()

    model = build_torch_model(args.arch, n_in, NUM_CLASSES).to(device).train()
    feature_dim = model.head.layers[0].num_features  # BatchNorm over the concat-pooled features
    trainable = list(model.parameters())
    teacher = heads = bank = None
    if uses_mkd or uses_clt:
        teacher = build_torch_model(args.arch, NUM_LEADS, NUM_CLASSES).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if uses_clt:
        heads = [TorchProjectionHead.build(feature_dim, cfg.clt.dim).to(device) for _ in range(2)]
        trainable += [p for h in heads for p in h.parameters()]
    labels, host_batches = make_data(batch_size=args.batch_size, crop=args.crop, num_batches=args.num_batches)
    if cache:
        add_teacher_cache(host_batches, feature_dim=feature_dim)
    if uses_clt and variant == "memory_bank":
        bank = Bank(torch.from_numpy(labels), cfg.clt.dim, gen)
    batches = []
    for b in host_batches:
        tb = {"x": torch.from_numpy(np.ascontiguousarray(b["x"].transpose(0, 2, 1))),  # (B, 12, T)
              "y": torch.from_numpy(b["y"]), "index": torch.from_numpy(b["index"].astype(np.int64))}
        if cache:
            tb["teacher_logits"] = torch.from_numpy(b["teacher_logits"])
            tb["teacher_features"] = torch.from_numpy(b["teacher_features"])
        batches.append({k: v.to(device) for k, v in tb.items()})

    opt = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.learning_rate, total_steps=args.total_steps,
                                                pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                                                cycle_momentum=False)
    last = {}
    # bfloat16: PyTorch's mixed precision (autocast around the forward pass and the losses; float32
    # parameters, gradients and optimizer), the counterpart of mvkt's `student.dtype=bfloat16`.
    bf16 = args.precision == "bfloat16"

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward_loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip_norm)
        opt.step()
        sched.step()
        last["loss"] = loss.detach()

    def forward_loss(b):
        x = b["x"] if n_in == NUM_LEADS else b["x"][:, :1]
        if teacher is not None:
            if "teacher_logits" in b:
                t_logits, t_features = b["teacher_logits"], b["teacher_features"]
            else:
                with torch.no_grad():
                    t_logits, t_features = teacher(b["x"])
        logits, features = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, b["y"])
        if uses_mkd:
            loss = loss + cfg.alpha * mkd(logits, t_logits, cfg.mkd_temperature)
        if uses_clt:
            se, te = heads[0](features), heads[1](t_features)
            if variant == "in_batch":
                clt = in_batch(se, te, b["y"], cfg.clt.temperature)
            else:
                clt = bank.loss(se, te, b["index"], b["y"], num_negatives=cfg.clt.num_negatives,
                                temperature=cfg.clt.temperature, momentum=cfg.clt.momentum)
            loss = loss + cfg.beta * clt
        return loss

    counter = {"i": 0}

    def run_steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step(batches[counter["i"] % len(batches)])
            counter["i"] += 1
        if on_gpu:  # kernels run asynchronously: wait for them, as JAX's block_until_ready
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first_step_s = run_steps(1)
    run_steps(max(args.warmup - 1, 0))
    peak_with_warmup_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu
                           else _hwm_mb() - baseline_mb)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    peak_reset = _reset_peak()
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    _say({"event": "ready", "first_step_s": first_step_s, "warmup_loss": float(last["loss"]),
          "params": {"model": sum(p.numel() for p in model.parameters()),
                     "heads": sum(p.numel() for h in (heads or []) for p in h.parameters()),
                     "teacher": n_teacher},
          "threads": torch.get_num_threads(), "torch_device": str(device),
          "tf32": bool(on_gpu and torch.backends.cudnn.allow_tf32)})

    def finish() -> dict:
        if on_gpu:
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            method = "torch.cuda.max_memory_allocated during the timed steps (device memory)"
        else:
            peak_mb = _hwm_mb() - baseline_mb
            method = ("process peak RSS (VmHWM) during timed steps minus RSS after imports"
                      if peak_reset else "process peak RSS (incl. warm-up) minus RSS after imports")
        return {"peak_mb": peak_mb, "peak_with_compile_mb": peak_with_warmup_mb, "baseline_rss_mb": baseline_mb,
                "final_loss": float(last["loss"]), "peak_method": method}

    _serve(run_steps, finish)


# ----------------------------------------------------------------------------- parameter check


def params_worker(args) -> None:
    """Flax vs. PyTorch parameter counts and shapes (PyTorch layout) of each arch, 12-lead and lead-I."""
    import jax
    import jax.numpy as jnp

    from mvkt import models

    out = {}
    for arch in args.archs.split(","):
        for leads in (NUM_LEADS, 1):
            variables = jax.eval_shape(
                lambda: models.create_model(arch, num_classes=NUM_CLASSES).init(
                    jax.random.PRNGKey(0), jnp.zeros((1, args.crop, leads)), train=False))
            flax_shapes = _flax_param_shapes(variables["params"])
            entry = {"flax": sum(math.prod(s) for s in flax_shapes)}
            try:
                net = build_torch_model(arch, leads, NUM_CLASSES)
                torch_shapes = torch_param_shapes(net)
                entry["torch"] = sum(math.prod(s) for s in torch_shapes)
                entry["shapes_match"] = torch_shapes == flax_shapes
            except ImportError:
                pass
            out[f"{arch}/{leads}-lead"] = entry
    _say({"event": "params", "counts": out})


# ----------------------------------------------------------------------------- coordinator


class Worker:
    def __init__(self, kind: str, args, arch: str, config: str, env: dict | None = None):
        self.kind = kind
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_{kind}_", suffix=".log", delete=False)
        cmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--_worker", kind, "--_arch", arch,
               "--_config", config, "--batch_size", str(args.batch_size), "--crop", str(args.crop),
               "--warmup", str(args.warmup), "--num_batches", str(args.num_batches),
               "--total_steps", str(args.total_steps), "--torch_device", args.torch_device,
               "--precision", args.precision]
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


def _torch_version() -> str | None:
    try:
        from importlib import metadata
        return metadata.version("torch")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have used (every core), from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _busy_load() -> float:
    return BUSY_LOAD_PER_CORE * _num_cores()


def _wait_for_quiet(limit_s: float) -> None:
    """Lets the 1-minute load average fall after the previous row (its own load) before a row starts."""
    deadline = time.perf_counter() + limit_s
    while os.getloadavg()[0] > _busy_load() / 1.5 and time.perf_counter() < deadline:
        time.sleep(5)


def bench_config(args, arch: str, config: str, have_torch: bool, jax_env: dict,
                 matmul_gflops: float | None = None) -> dict:
    _wait_for_quiet(args.settle_s)
    row: dict = {"arch": arch, "config": config, "precision": args.precision,
                 "load_average_start": os.getloadavg()}
    started, machine0, own0 = time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds()
    jw = Worker("jax", args, arch, config, env=jax_env)
    tw = None
    try:
        ready = jw.read()
        row["jax"] = {k: ready[k] for k in ("trace_s", "compile_s", "first_step_s", "warmup_metrics", "params",
                                            "xla_memory_mb", "rss_before_compile_mb", "rss_after_compile_mb",
                                            "flops_per_step")}
        row["device"], row["platform"], row["num_devices"] = ready["device"], ready["platform"], ready["num_devices"]
        if have_torch:
            tw = Worker("torch", args, arch, config)
            tready = tw.read()
            row["torch"] = {k: tready[k] for k in ("first_step_s", "warmup_loss", "params", "threads",
                                                   "torch_device", "tf32")}
        jt, tt = [], []
        for r in range(args.repeats):
            order = [(jw, jt), (tw, tt)] if r % 2 == 0 else [(tw, tt), (jw, jt)]
            for w, times in order:
                if w is None:
                    continue
                time.sleep(0.2)  # let the other framework's worker threads go idle
                w.send(f"run {args.steps}")
                times.append(w.read()["seconds"] / args.steps)
        for w, times, key in ((jw, jt, "jax"), (tw, tt, "torch")):
            if w is None:
                continue
            w.send("done")
            row[key].update(w.read())
            med = statistics.median(times)
            row[key].update({"step_times_s": times, "median_step_s": med, "samples_per_s": args.batch_size / med})
            w.proc.wait(timeout=60)
        if tw is not None:
            row["ratio"] = row["jax"]["samples_per_s"] / row["torch"]["samples_per_s"]
            # Robustness check against load drift: median of the ratios of adjacent rounds.
            row["paired_ratio_median"] = statistics.median(t / j for j, t in zip(jt, tt))
            row["params_match"] = row["jax"]["params"] == row["torch"]["params"]
        row["load_average_end"] = os.getloadavg()
        # The benchmark's own two busy cores lift the load towards 2 during a row, so the load at the
        # row's start is the load test; during the row, the CPU time of every other process is.
        row["other_processes_cpu_cores"] = max(
            0.0, (_machine_busy_seconds() - machine0 - (_own_cpu_seconds() - own0)) / (time.perf_counter() - started))
        row["busy"] = row["load_average_start"][0] > _busy_load() or row["other_processes_cpu_cores"] > BUSY_OTHER_CORES
        flops = row["jax"].get("flops_per_step")
        if flops:
            row["jax"]["gflop_per_s"] = flops / row["jax"]["median_step_s"] / 1e9
            if matmul_gflops:
                row["jax"]["share_of_peak"] = row["jax"]["gflop_per_s"] / matmul_gflops
                if tw is not None:  # the same FLOPs in the torch step's time
                    row["torch"]["share_of_peak"] = flops / row["torch"]["median_step_s"] / 1e9 / matmul_gflops
    finally:
        jw.close()
        if tw is not None:
            tw.close()
    return row


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown_table(rows: list[dict], torch_skipped: str | None, matmul_gflops: float | None = None,
                   matmul_n: int = 2048) -> str:
    lines = ["| config | JAX samples/s | torch samples/s | ratio | JAX share of peak | torch share of peak | "
             "JAX peak MB | torch peak MB | compile s | load before -> after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = f"{r['arch']} {r['config']}"
        if r.get("precision", "float32") != "float32":
            label += f" ({r['precision']})"
        if r.get("platform", "cpu") != "cpu":
            label += f" [{r['device']}]"
        t = r.get("torch") or {}
        load = f"{r['load_average_start'][0]:.2f} -> {r['load_average_end'][0]:.2f}"
        if "other_processes_cpu_cores" in r:
            load += f", others {r['other_processes_cpu_cores']:.2f} cores"
        load += " BUSY" if r.get("busy") else ""
        lines.append(
            f"| {label} | {r['jax']['samples_per_s']:.1f} | {_fmt(t.get('samples_per_s'), '.1f')} | "
            f"{_fmt(r.get('ratio'), '.2f')} | {_fmt(r['jax'].get('share_of_peak'), '.0%')} | "
            f"{_fmt(t.get('share_of_peak'), '.0%')} | {r['jax']['peak_mb']:.0f} | {_fmt(t.get('peak_mb'), '.0f')} | "
            f"{r['jax']['trace_s'] + r['jax']['compile_s']:.1f} | {load} |")
    if matmul_gflops:
        lines.append(f"\nShare of peak: the step's XLA-counted FLOPs per second over this machine's measured "
                     f"float32 matrix-multiply rate ({matmul_gflops:.0f} GFLOP/s, jitted {matmul_n}x{matmul_n} matmul"
                     f"{'' if matmul_n == 2048 else ', XLA default precision (TF32 on GPU)'}).")
    if any(r.get("busy") for r in rows):
        lines.append(f"\nBUSY rows started at a 1-minute load average above {_busy_load():g} or other processes used more "
                     f"than {BUSY_OTHER_CORES} cores during them: do not publish them.")
    if torch_skipped:
        lines.append(f"\ntorch columns empty: PyTorch reference skipped ({torch_skipped}).")
    return "\n".join(lines)


def matmul_worker(args) -> None:
    """This machine's float32 matrix-multiply rate through XLA (the yardstick of "share of peak")."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.devices()[0].platform == "cpu" else 8192  # big enough to reach a GPU's rate
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(5):
            out = f(a)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / 5)
    _say({"event": "matmul", "gflops": 2 * n**3 / statistics.median(times) / 1e9, "n": n})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated mvkt.models architectures")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=1, help="steps per timing round")
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds per framework (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=250, help="crop length in samples (2.5 s at 100 Hz)")
    ap.add_argument("--num_batches", type=int, default=4, help="distinct synthetic batches cycled through")
    ap.add_argument("--total_steps", type=int, default=10_000, help="length of the one-cycle LR schedule")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: resnet1d_wang only (unless --archs), batch 16, 1 step x 2 rounds")
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--jax_env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the JAX workers only, e.g. XLA_FLAGS=... (repeatable)")
    ap.add_argument("--torch_device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where the PyTorch reference runs; auto: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of both frameworks; bfloat16 changes the numerics (opt-in: "
                         "`student.dtype=bfloat16` in mvkt, autocast in PyTorch), so its rows are reported apart")
    ap.add_argument("--settle_s", type=float, default=90.0,
                    help="longest wait before a row for the 1-minute load average to fall below 0.5 per core "
                         "(0 on a GPU machine, where the step does not compete for the CPU cores)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument("--_worker", choices=("jax", "torch", "params", "matmul"), help=argparse.SUPPRESS)
    ap.add_argument("--_arch", help=argparse.SUPPRESS)
    ap.add_argument("--_config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        if "--archs" not in " ".join(sys.argv if argv is None else argv):
            args.archs = "resnet1d_wang"
        args.batch_size, args.steps, args.repeats, args.warmup, args.num_batches = 16, 1, 2, 1, 2
    args.arch, args.config = args._arch, args._config
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker == "jax":
        jax_worker(args)
        return 0
    if args._worker == "torch":
        torch_worker(args)
        return 0
    if args._worker == "params":
        params_worker(args)
        return 0
    if args._worker == "matmul":
        matmul_worker(args)
        return 0

    archs = [a for a in args.archs.split(",") if a]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    jax_env = dict(kv.split("=", 1) for kv in args.jax_env)
    torch_version = _torch_version()
    have_torch = torch_version is not None and not args.no_torch
    why = None
    if not have_torch:
        why = "--no_torch given" if args.no_torch else f"torch is not installed; install it with `{TORCH_INSTALL}`"
        print(f"PyTorch reference skipped ({why}): torch columns will be empty.", flush=True)
    elif torch_version.split("+")[0] != "2.13.0":
        print(f"note: torch {torch_version} installed; the reference numbers in docs/BENCHMARKS.md use 2.13.0")
    if args.torch_device == "auto":
        args.torch_device = "cpu"
        if have_torch:
            import torch
            args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    if have_torch:
        print(f"PyTorch reference on {args.torch_device}", flush=True)

    started = time.perf_counter()
    # Parameter check (fresh process, so the coordinator stays light).
    pcmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--_worker", "params",
            "--archs", ",".join(archs), "--crop", str(args.crop)]
    pout = subprocess.run(pcmd, capture_output=True, text=True, cwd=str(ROOT))
    param_lines = [ln for ln in pout.stdout.splitlines() if ln.startswith(MARK)]
    if pout.returncode or not param_lines:
        raise SystemExit(f"parameter check failed:\n{pout.stderr[-3000:]}")
    counts = json.loads(param_lines[-1][len(MARK):])["counts"]
    print("Parameter counts (net only, PyTorch layout shapes compared one to one):")
    mismatch = False
    for name, c in counts.items():
        if have_torch and "torch" in c:
            ok = c["torch"] == c["flax"] and c["shapes_match"]
            mismatch |= not ok
            print(f"  {name:28s} flax {c['flax']:>10,d}  torch {c['torch']:>10,d}  "
                  f"{'match' if ok else 'MISMATCH'}")
        else:
            print(f"  {name:28s} flax {c['flax']:>10,d}")
    if mismatch:
        raise SystemExit("the PyTorch reference does not match the Flax nets; refusing to compare them")

    mcmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--_worker", "matmul"]
    mout = subprocess.run(mcmd, capture_output=True, text=True, cwd=str(ROOT), env={**os.environ, **jax_env})
    matmul_lines = [ln for ln in mout.stdout.splitlines() if ln.startswith(MARK)]
    matmul = json.loads(matmul_lines[-1][len(MARK):]) if matmul_lines else {}
    matmul_gflops, matmul_n = matmul.get("gflops"), matmul.get("n", 2048)
    print(f"float32 matrix-multiply rate: {_fmt(matmul_gflops, '.0f')} GFLOP/s (load {os.getloadavg()[0]:.2f})")

    settings = {k: getattr(args, k) for k in ("archs", "configs", "steps", "repeats", "warmup", "batch_size",
                                              "crop", "num_batches", "total_steps", "quick", "torch_device",
                                              "settle_s", "precision")}
    settings.update({"num_classes": NUM_CLASSES, "num_leads": NUM_LEADS, "memory_bank_records": NUM_RECORDS,
                     "command": " ".join([os.path.basename(sys.executable)] + sys.argv)})
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": _versions(), "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "cpu_affinity": _num_cores(), "cpu_model": _cpu_model(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "jax_env": jax_env}
    out = pathlib.Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], table: str | None) -> None:
        # Rewritten after every row, so that a run cut short (a time limit on a lent GPU) keeps its rows.
        result = {"environment": {**env, "load_average": os.getloadavg()}, "settings": settings,
                  "param_counts": counts, "rows": rows, "complete": table is not None,
                  "matmul_gflops": matmul_gflops, "matmul_n": matmul_n, "busy_load": _busy_load(),
                  "markdown": table, "total_seconds": time.perf_counter() - started}
        if rows:
            result["environment"].update(device=rows[0]["device"], device_platform=rows[0]["platform"],
                                         num_devices=rows[0]["num_devices"])
        out.write_text(json.dumps(result, indent=2) + "\n")

    rows = []
    for arch in archs:
        for config in configs:
            t0 = time.perf_counter()
            row = bench_config(args, arch, config, have_torch, jax_env, matmul_gflops)
            rows.append(row)
            write(rows, None)
            t = row.get("torch")
            print(f"[{time.perf_counter() - started:6.0f}s] {arch} {config}: JAX {row['jax']['samples_per_s']:.1f}/s"
                  + (f", torch {t['samples_per_s']:.1f}/s, ratio {row['ratio']:.2f}" if t else "")
                  + f" ({time.perf_counter() - t0:.0f}s; load {row['load_average_start'][0]:.2f} -> "
                  f"{row['load_average_end'][0]:.2f}, others {row['other_processes_cpu_cores']:.2f} cores"
                  f"{', BUSY: do not publish' if row['busy'] else ''})", flush=True)

    table = markdown_table(rows, why, matmul_gflops, matmul_n)
    print()
    print(table)
    write(rows, table)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
