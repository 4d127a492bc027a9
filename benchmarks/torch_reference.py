"""The PyTorch reference of ``benchmarks/train_step.py``: a port of mvkt's nets (same layers,
widths, kernels, paddings; parameter shapes are checked against the Flax nets before
timing), its losses (BCE, tempered binary-KL MKD, symmetric disease-aware in-batch InfoNCE,
CRD memory-bank NCE with disease-aware negative sampling and momentum update) and
AdamW + gradient clipping + one-cycle LR, channels-first ``(B, L, T)``, and the worker that
times it. PyTorch is a benchmark-only dependency (``pip install torch==2.13.0``), never
one of mvkt's.
"""

from __future__ import annotations

import math
import time

from benchmarks import harness


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



def _device(name: str):
    """(torch device, whether it is a GPU), with the threads and precision of the comparison."""
    import torch

    torch.set_num_threads(harness.num_cores())
    device = torch.device(name)
    on_gpu = device.type == "cuda"
    if on_gpu:  # XLA's default float32 precision on GPU lets dots and convolutions use TF32: the same here
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest algorithms once
    return device, on_gpu


def _channels_first(host_batches: list[dict], device) -> list[dict]:
    """The synthetic batches as torch tensors on ``device``, x as (B, 12, T)."""
    import numpy as np
    import torch

    batches = []
    for b in host_batches:
        tb = {"x": torch.from_numpy(np.ascontiguousarray(b["x"].transpose(0, 2, 1))),
              "y": torch.from_numpy(b["y"]), "index": torch.from_numpy(b["index"].astype(np.int64))}
        for key in ("teacher_logits", "teacher_features"):
            if key in b:
                tb[key] = torch.from_numpy(b[key])
        batches.append({k: v.to(device) for k, v in tb.items()})
    return batches


def _nets(arch: str, n_in: int, *, teacher: bool, clt_dim: int | None, device):
    """(the trained net, the frozen 12-lead teacher or None, the two CLT heads or None)."""
    model = build_torch_model(arch, n_in, harness.NUM_CLASSES).to(device).train()
    frozen = heads = None
    if teacher:
        frozen = build_torch_model(arch, harness.NUM_LEADS, harness.NUM_CLASSES).to(device).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
    if clt_dim is not None:
        feature_dim = model.head.layers[0].num_features
        heads = [TorchProjectionHead.build(feature_dim, clt_dim).to(device) for _ in range(2)]
    return model, frozen, heads


def _optimizer(trainable: list, train_config, total_steps: int):
    """AdamW with the one-cycle schedule of mvkt's default config (fastai's fit_one_cycle)."""
    import torch

    opt = torch.optim.AdamW(trainable, lr=train_config.learning_rate, weight_decay=train_config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_config.learning_rate, total_steps=total_steps,
                                                pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                                                cycle_momentum=False)
    return opt, sched


def _report_ready(first_step_s: float, loss: float, model, teacher, heads, device) -> None:
    import torch

    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    harness.emit({"event": "ready", "first_step_s": first_step_s, "warmup_loss": loss,
                  "params": {"model": count([model]), "heads": count(heads or []),
                             "teacher": count([teacher] if teacher is not None else [])},
                  "threads": torch.get_num_threads(), "torch_device": str(device),
                  "tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32)})


def torch_worker(args) -> None:
    import torch
    import torch.nn.functional as F

    device, on_gpu = _device(args.torch_device)
    baseline_mb = harness.rss_mb()
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)

    from experiments.configs import default

    cfg = default.get_config()
    method, leads, variant, cache = harness.CONFIGS[args.config]
    n_in = harness.NUM_LEADS if leads == "all" else 1  # lead I is channel 0
    uses_mkd = uses_clt = method == "mvkt"
    mkd, in_batch, Bank = torch_losses()

    model, teacher, heads = _nets(args.arch, n_in, teacher=uses_mkd or uses_clt, clt_dim=cfg.clt.dim if uses_clt
                                  else None, device=device)
    feature_dim = model.head.layers[0].num_features  # BatchNorm over the concat-pooled features
    trainable = list(model.parameters()) + [p for h in (heads or []) for p in h.parameters()]
    bank = None
    labels, host_batches = harness.make_data(batch_size=args.batch_size, crop=args.crop, num_batches=args.num_batches,
                                             num_records=args.num_records)
    if cache:
        harness.add_teacher_cache(host_batches, feature_dim=feature_dim)
    if uses_clt and variant == "memory_bank":
        bank = Bank(torch.from_numpy(labels), cfg.clt.dim, gen)
    batches = _channels_first(host_batches, device)

    opt, sched = _optimizer(trainable, cfg.train, args.total_steps)
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
        x = b["x"] if n_in == harness.NUM_LEADS else b["x"][:, :1]
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
                           else harness.hwm_mb() - baseline_mb)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    held_before_steps_mb = (torch.cuda.memory_allocated(device) / 2**20 if on_gpu
                            else harness.rss_mb() - baseline_mb)
    peak_reset = harness.reset_peak()
    _report_ready(first_step_s, float(last["loss"]), model, teacher, heads, device)

    def finish() -> dict:
        if on_gpu:
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            method = "torch.cuda.max_memory_allocated during the timed steps (device memory)"
        else:
            peak_mb = harness.hwm_mb() - baseline_mb
            method = ("process peak RSS (VmHWM) during timed steps minus RSS after imports"
                      if peak_reset else "process peak RSS (incl. warm-up) minus RSS after imports")
        return {"peak_mb": peak_mb, "peak_with_compile_mb": peak_with_warmup_mb, "baseline_rss_mb": baseline_mb,
                "held_before_steps_mb": held_before_steps_mb,
                "final_loss": float(last["loss"]), "peak_method": method}

    harness.serve(run_steps, finish)
