"""Export of a trained run's net for deployment: ONNX (float32, int8) and StableHLO.

ONNX graph: input ``ecg`` float32 ``(batch, window, leads)`` (raw samples at the run's
sampling rate, after its band-pass if it had one; the run's standardisation is the graph's
first op), output ``probabilities`` float32 ``(batch, classes)`` (sigmoid), batch axis
dynamic, BatchNorm folded into the convolutions. The run's label names, leads, sampling
rate, window, stride, aggregation, standardisation and validation thresholds are stored
in the model's metadata (``metadata_props``).

Why a converter of its own: jax2onnx (the maintained JAX -> ONNX exporter) pins
``orbax-checkpoint<0.11.37`` in 0.16 and 0.17, which conflicts with the project's orbax,
and pulls in equinox, dm-pix, huggingface-hub and netron. The six nets of ``mvkt.models``
need only 16 primitives in eval mode, so this module converts the eval-mode jaxpr itself
with the ``onnx`` package: elementwise ops, ``conv_general_dilated``,
``reduce_window_{max,sum}``, ``reduce_{max,sum}``, ``concatenate``, ``dot_general``,
``reshape``, ``broadcast_in_dim`` (of constants), ``logistic``, ``rsqrt``. Anything else
raises ``UnsupportedError`` naming the primitive. Rank-3 activations are kept in ONNX's
``(N, C, W)`` layout (one transpose at the input) and every ``Conv`` followed by a
per-channel ``Mul``/``Add``/``Sub``/``Div`` constant (eval-mode BatchNorm, biases) absorbs it.

int8: ``onnxruntime.quantization`` static QDQ quantization (per-channel int8 weights, int8
activations) calibrated on windows of the run's training split; without the shards,
dynamic quantization (int8 weights only), said in the result.

StableHLO: ``jax.export`` with a symbolic batch axis, serialized (load with
``jax.export.deserialize(bytes).call(x)``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mvkt import data as data_lib
from mvkt import inference
from mvkt import parallel as parallel_lib
from mvkt import run_dir

INPUT_NAME = "ecg"
OUTPUT_NAME = "probabilities"
OPSET = 18
# The batch size the graph is traced with; it stands for the dynamic batch axis, so it
# must differ from every other dimension of the net (a prime far above any width).
_TRACE_BATCH = 1009


class UnsupportedError(NotImplementedError):
    """The net uses a primitive (or a form of one) the ONNX converter does not handle."""


# ----------------------------------------------------------------------------- the function exported


@dataclasses.dataclass(frozen=True)
class ExportedNet:
    """The eval-mode net of a run as one function of raw windows, with what describes it."""

    fn: Callable[[jax.Array], jax.Array]  # (B, window, leads) raw -> (B, C) probabilities
    window: int
    leads: list[str]
    metadata: dict[str, str]


def exported_net(workdir: str | pathlib.Path, *, which: str = "best") -> ExportedNet:
    workdir = pathlib.Path(workdir)
    parallel = parallel_lib.make_parallelism(jax.devices()[:1])
    model, variables, _, info, meta = run_dir.load_trained_model(workdir, which=which, parallel=parallel)
    prep = inference.Preprocessing.of_run(workdir)
    index = data_lib.lead_indices(prep.leads)
    mean, std = prep.mean[index], prep.std[index]
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(variables))

    def fn(x):
        logits, _ = model.apply(variables, (x - mean) / std, train=False)
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    thresholds = inference.load_thresholds(workdir)
    metadata = {
        "label_names": json.dumps(list(info["label_names"])),
        "leads": json.dumps(prep.leads),
        "sampling_rate_hz": str(prep.sampling_rate),
        "window_samples": str(prep.window),
        "stride_samples": str(prep.stride),
        "aggregate": prep.aggregate,
        "band_pass_hz": json.dumps(list(prep.band_pass) if prep.band_pass else None),
        "standardization": json.dumps({"mean": mean.tolist(), "std": std.tolist(), "in_graph": True}),
        "thresholds": json.dumps(thresholds),
        "source_run": str(workdir.absolute()),
        "checkpoint": f"{which} (step {meta.get('step')})",
        "input": f"{INPUT_NAME}: float32 (batch, {prep.window}, {len(prep.leads)}) raw samples at "
        f"{prep.sampling_rate} Hz, leads {','.join(prep.leads)}",
        "output": f"{OUTPUT_NAME}: float32 (batch, {len(info['label_names'])}) sigmoid probabilities",
    }
    return ExportedNet(fn=fn, window=prep.window, leads=prep.leads, metadata=metadata)


# ----------------------------------------------------------------------------- jaxpr -> ONNX


@dataclasses.dataclass
class _Tensor:
    name: str
    shape: tuple  # logical (JAX) shape; _TRACE_BATCH marks the batch axis
    perm: tuple  # stored axis i holds logical axis perm[i]: (0, 2, 1) for rank 3, identity otherwise


def _stored_perm(rank: int) -> tuple:
    return (0, 2, 1) if rank == 3 else tuple(range(rank))


class _Converter:
    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}
        self._names = 0

    def fresh(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}_{self._names}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        array = np.asarray(array)
        self.initializers[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self.fresh(prefix or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    # Values are np.ndarray (constants, logical layout) or _Tensor.

    def to_layout(self, value, like: _Tensor) -> str:
        """A constant broadcastable against ``like``, as an initializer in ``like``'s stored layout."""
        c = np.asarray(value, np.float32)
        if c.ndim > len(like.shape):
            raise UnsupportedError(f"constant of shape {c.shape} against a tensor of shape {like.shape}")
        c = c.reshape((1,) * (len(like.shape) - c.ndim) + c.shape)
        return self.const(np.transpose(c, like.perm) if c.ndim == len(like.perm) else c)

    def logical(self, t: _Tensor) -> str:
        if t.perm == tuple(range(len(t.perm))):
            return t.name
        inverse = tuple(int(i) for i in np.argsort(t.perm))
        return self.node("Transpose", [t.name], perm=list(inverse))

    def stored(self, name: str, shape: tuple) -> _Tensor:
        """A tensor given in logical layout -> the stored layout of its rank."""
        perm = _stored_perm(len(shape))
        if perm != tuple(range(len(shape))):
            name = self.node("Transpose", [name], perm=list(perm))
        return _Tensor(name, tuple(shape), perm)

    # ---- the jaxpr walk

    def run(self, jaxpr, consts: list, args: list) -> list:
        env: dict = {}

        def read(v):
            if isinstance(v, jax.extend.core.Literal):
                return np.asarray(v.val)
            return env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = np.asarray(value)
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            outputs = self.eqn(eqn, inputs)
            for var, value in zip(eqn.outvars, outputs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, inputs: list) -> list:
        name = eqn.primitive.name
        params = eqn.params
        if name in ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "remat", "checkpoint"):
            closed = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
            inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
            consts = closed.consts if hasattr(closed, "consts") else []
            return self.run(inner, consts, inputs)
        if all(isinstance(x, np.ndarray) for x in inputs):
            if name == "broadcast_in_dim":  # keep constants small: broadcasting happens in the consumer
                (x,) = inputs
                shape, dims = params["shape"], params["broadcast_dimensions"]
                expanded = [x.shape[dims.index(d)] if d in dims else 1 for d in range(len(shape))]
                return [x.reshape(expanded)]
            return [np.asarray(out) for out in _as_list(eqn.primitive.bind(*inputs, **params))]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        handler = getattr(self, f"_{name}", None)
        if handler is None:
            raise UnsupportedError(f"primitive {name!r} is not supported by the ONNX export")
        return [handler(inputs, params, out_shape)]

    # ---- elementwise

    def _binary(self, op: str, inputs: list, out_shape: tuple):
        a, b = inputs
        like = a if isinstance(a, _Tensor) else b
        names = []
        for x in (a, b):
            if isinstance(x, _Tensor):
                if x.perm != like.perm:
                    raise UnsupportedError(f"{op} of tensors in different layouts")
                names.append(x.name)
            else:
                names.append(self.to_layout(x, like))
        # Constants never outrank their tensor (to_layout refuses), so the result keeps its layout.
        return _Tensor(self.node(op, names), out_shape, like.perm)

    def _add(self, inputs, params, out_shape):
        return self._binary("Add", inputs, out_shape)

    def _sub(self, inputs, params, out_shape):
        return self._binary("Sub", inputs, out_shape)

    def _mul(self, inputs, params, out_shape):
        return self._binary("Mul", inputs, out_shape)

    def _div(self, inputs, params, out_shape):
        return self._binary("Div", inputs, out_shape)

    def _max(self, inputs, params, out_shape):
        a, b = inputs
        for tensor, other in ((a, b), (b, a)):
            if isinstance(tensor, _Tensor) and isinstance(other, np.ndarray) and other.size == 1 and float(other) == 0:
                return _Tensor(self.node("Relu", [tensor.name]), tensor.shape, tensor.perm)
        return self._binary("Max", inputs, out_shape)

    def _min(self, inputs, params, out_shape):
        return self._binary("Min", inputs, out_shape)

    def _unary(self, op: str, inputs: list):
        (x,) = inputs
        return _Tensor(self.node(op, [x.name]), x.shape, x.perm)

    def _logistic(self, inputs, params, out_shape):
        return self._unary("Sigmoid", inputs)

    def _neg(self, inputs, params, out_shape):
        return self._unary("Neg", inputs)

    def _exp(self, inputs, params, out_shape):
        return self._unary("Exp", inputs)

    def _sqrt(self, inputs, params, out_shape):
        return self._unary("Sqrt", inputs)

    def _rsqrt(self, inputs, params, out_shape):
        (x,) = inputs
        return _Tensor(self.node("Reciprocal", [self.node("Sqrt", [x.name])]), x.shape, x.perm)

    def _convert_element_type(self, inputs, params, out_shape):
        (x,) = inputs
        if np.dtype(params["new_dtype"]) != np.float32:
            raise UnsupportedError(f"conversion to {params['new_dtype']} (export runs in float32)")
        return x

    def _copy(self, inputs, params, out_shape):
        return inputs[0]

    _copy_p = _copy

    # ---- structure

    def _conv_general_dilated(self, inputs, params, out_shape):
        x, w = inputs
        if not isinstance(x, _Tensor) or not isinstance(w, np.ndarray) or w.ndim != 3:
            raise UnsupportedError("conv_general_dilated other than a 1-D convolution of an activation by weights")
        dn = params["dimension_numbers"]
        if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != ((0, 2, 1), (2, 1, 0), (0, 2, 1)):
            raise UnsupportedError(f"conv layout {dn} (expected NWC, WIO, NWC)")
        if tuple(params["lhs_dilation"]) != (1,) or params.get("batch_group_count", 1) != 1:
            raise UnsupportedError("transposed or batch-grouped convolutions")
        (lo, hi), = params["padding"]
        out = self.node(
            "Conv",
            [x.name, self.const(np.transpose(w, (2, 1, 0)), "conv_w")],
            kernel_shape=[int(w.shape[0])],
            strides=[int(s) for s in params["window_strides"]],
            dilations=[int(d) for d in params["rhs_dilation"]],
            pads=[int(lo), int(hi)],
            group=int(params["feature_group_count"]),
        )
        return _Tensor(out, out_shape, x.perm)

    def _reduce_window(self, inputs, params, out_shape, *, op: str):
        (x,) = inputs
        dims, strides = params["window_dimensions"], params["window_strides"]
        pads = params["padding"]
        if (len(dims) != 3 or dims[0] != 1 or dims[2] != 1 or strides[0] != 1 or strides[2] != 1
                or tuple(pads[0]) != (0, 0) or tuple(pads[2]) != (0, 0)
                or any(d != 1 for d in params["base_dilation"]) or any(d != 1 for d in params["window_dilation"])):
            raise UnsupportedError(f"{op} pooling other than over the time axis of (B, T, C)")
        attrs = dict(kernel_shape=[int(dims[1])], strides=[int(strides[1])], pads=[int(pads[1][0]), int(pads[1][1])])
        if op == "MaxPool":
            return _Tensor(self.node("MaxPool", [x.name], **attrs), out_shape, x.perm)
        mean = self.node("AveragePool", [x.name], count_include_pad=1, **attrs)
        return _Tensor(self.node("Mul", [mean, self.const(np.float32(dims[1]))]), out_shape, x.perm)

    def _reduce_window_max(self, inputs, params, out_shape):
        return self._reduce_window(inputs, params, out_shape, op="MaxPool")

    def _reduce_window_sum(self, inputs, params, out_shape):
        return self._reduce_window(inputs, params, out_shape, op="SumPool")

    def _reduce(self, op: str, inputs, params, out_shape):
        (x,) = inputs
        axes = [int(a) for a in params["axes"]]
        stored_axes = [x.perm.index(a) for a in axes]
        out = self.node(op, [x.name, self.const(np.asarray(stored_axes, np.int64), "axes")], keepdims=0)
        remaining = [a for a in x.perm if a not in axes]  # logical axes, in stored order
        order = tuple(int(i) for i in np.argsort(remaining))
        if order != tuple(range(len(remaining))):
            out = self.node("Transpose", [out], perm=list(order))
        return self.stored(out, out_shape) if len(out_shape) == 3 else _Tensor(out, out_shape, _stored_perm(len(out_shape)))

    def _reduce_max(self, inputs, params, out_shape):
        return self._reduce("ReduceMax", inputs, params, out_shape)

    def _reduce_sum(self, inputs, params, out_shape):
        return self._reduce("ReduceSum", inputs, params, out_shape)

    def _concatenate(self, inputs, params, out_shape):
        if not all(isinstance(x, _Tensor) for x in inputs) or len({x.perm for x in inputs}) != 1:
            raise UnsupportedError("concatenate of constants or of tensors in different layouts")
        perm = inputs[0].perm
        axis = perm.index(int(params["dimension"]))
        return _Tensor(self.node("Concat", [x.name for x in inputs], axis=axis), out_shape, perm)

    def _dot_general(self, inputs, params, out_shape):
        x, w = inputs
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if not isinstance(w, np.ndarray) or len(x.shape) != 2 or w.ndim != 2 or tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb:
            raise UnsupportedError("dot_general other than (batch, features) @ (features, outputs) weights")
        return _Tensor(self.node("MatMul", [x.name, self.const(w, "dense_w")]), out_shape, x.perm)

    def _reshape_to(self, x: _Tensor, out_shape: tuple) -> _Tensor:
        shape = [-1 if d == _TRACE_BATCH else int(d) for d in out_shape]
        if out_shape and out_shape[0] != _TRACE_BATCH:
            raise UnsupportedError(f"reshape {x.shape} -> {out_shape} moves the batch axis")
        out = self.node("Reshape", [self.logical(x), self.const(np.asarray(shape, np.int64), "shape")])
        return self.stored(out, out_shape)

    def _reshape(self, inputs, params, out_shape):
        return self._reshape_to(inputs[0], out_shape)

    def _squeeze(self, inputs, params, out_shape):
        return self._reshape_to(inputs[0], out_shape)

    def _expand_dims(self, inputs, params, out_shape):
        return self._reshape_to(inputs[0], out_shape)

    def _broadcast_in_dim(self, inputs, params, out_shape):
        (x,) = inputs
        if int(np.prod([d for d in x.shape])) != int(np.prod(out_shape)):
            raise UnsupportedError(f"broadcast of an activation {x.shape} -> {out_shape}")
        return self._reshape_to(x, out_shape)


def _as_list(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _fold_affine_into_conv(nodes: list, initializers: dict) -> list:
    """Conv -> Mul/Div/Add/Sub by a per-channel constant, with the Conv's output used only
    there: the constant goes into the Conv's weights and bias (eval BatchNorm, biases)."""
    from onnx import helper

    while True:
        consumers: dict[str, list] = {}
        for node in nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        producer = {out: node for node in nodes for out in node.output}
        folded = False
        for node in nodes:
            if node.op_type not in ("Mul", "Div", "Add", "Sub") or len(node.input) != 2:
                continue
            tensor, const = node.input
            conv = producer.get(tensor)
            if conv is None or conv.op_type != "Conv" or const not in initializers or len(consumers.get(tensor, [])) != 1:
                continue
            w = initializers[conv.input[1]]
            c = initializers[const]
            channels = w.shape[0]
            if c.size not in (1, channels) or (c.size == channels and c.ndim == 3 and c.shape != (1, channels, 1)):
                continue
            c = np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)
            b = initializers[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else np.zeros(channels)
            w = w.astype(np.float64)
            if node.op_type == "Mul":
                w, b = w * c[:, None, None], b * c
            elif node.op_type == "Div":
                w, b = w / c[:, None, None], b / c
            elif node.op_type == "Add":
                b = b + c
            else:
                b = b - c
            initializers[conv.input[1]] = w.astype(np.float32)
            bias_name = conv.input[2] if len(conv.input) > 2 else f"{conv.input[1]}_bias"
            initializers[bias_name] = b.astype(np.float32)
            replacement = helper.make_node("Conv", [conv.input[0], conv.input[1], bias_name], [node.output[0]],
                                           **{a.name: helper.get_attribute_value(a) for a in conv.attribute})
            nodes = [replacement if n is conv else n for n in nodes if n is not node]
            folded = True
            break
        if not folded:
            used = {name for n in nodes for name in n.input}
            for name in [k for k in initializers if k not in used]:
                del initializers[name]
            return nodes


def to_onnx(net: ExportedNet, path: str | pathlib.Path) -> dict:
    """Writes the ONNX model of ``net`` to ``path``; returns a summary (ops, size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    closed = jax.make_jaxpr(net.fn)(jax.ShapeDtypeStruct((_TRACE_BATCH, net.window, len(net.leads)), jnp.float32))
    conv = _Converter()
    x = conv.stored(INPUT_NAME, (_TRACE_BATCH, net.window, len(net.leads)))
    (out,) = conv.run(closed.jaxpr, closed.consts, [x])
    if not isinstance(out, _Tensor) or len(out.shape) != 2:
        raise UnsupportedError(f"the net's output is not a (batch, classes) tensor: {out}")
    conv.nodes.append(helper.make_node("Identity", [conv.logical(out)], [OUTPUT_NAME]))
    nodes = _fold_affine_into_conv(conv.nodes, conv.initializers)
    graph = helper.make_graph(
        nodes,
        "mvkt_student",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", net.window, len(net.leads)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", int(out.shape[1])])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in conv.initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mvkt")
    model.ir_version = 9  # readable by onnxruntime releases of the last two years
    for key, value in net.metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = pathlib.Path(path)
    onnx.save(model, path)
    ops: dict[str, int] = {}
    for node in nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "ops": ops}


def quantize_int8(fp32_path: str | pathlib.Path, out_path: str | pathlib.Path, *,
                  calibration: np.ndarray | None) -> dict:
    """int8 model: static QDQ calibrated on ``calibration`` windows (raw, (N, window, leads)),
    or dynamic (weights only) when there are none."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if calibration is None:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8)
        return {"path": str(out_path), "bytes": pathlib.Path(out_path).stat().st_size,
                "method": "dynamic (int8 weights; no training shards to calibrate activations)"}

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration.astype(np.float32), max(len(calibration) // 32, 1)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(str(fp32_path), str(out_path), Windows(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    return {"path": str(out_path), "bytes": pathlib.Path(out_path).stat().st_size,
            "method": f"static QDQ, per-channel int8 weights, int8 activations calibrated on {len(calibration)} "
            "training windows"}


def calibration_windows(workdir: str | pathlib.Path, *, count: int = 512, seed: int = 0) -> np.ndarray | None:
    """Raw windows (before standardisation) of the run's training split, or None without its shards."""
    info = run_dir.load_info(workdir)
    try:
        split = data_lib.open_split(info["data_dir"], "train", folds=info.get("folds"))
    except (data_lib.ShardError, FileNotFoundError):
        return None
    prep = inference.Preprocessing.of_run(workdir)
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(split), size=min(count, len(split)), replace=False)
    slack = np.maximum(split.lengths[indices] - prep.window, 0)
    starts = rng.integers(0, slack + 1)
    index = data_lib.lead_indices(prep.leads)
    x = split.select_leads(prep.leads).crop(indices, starts, prep.window)
    own = split.manifest["preprocessing"]["standardization"]
    return (x * np.asarray(own["std"], np.float32)[index] + np.asarray(own["mean"], np.float32)[index]).astype(np.float32)


def to_stablehlo(net: ExportedNet, path: str | pathlib.Path) -> dict:
    """Serialized ``jax.export`` of ``net`` with a symbolic batch axis."""
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(net.fn))(
        jax.ShapeDtypeStruct((batch, net.window, len(net.leads)), jnp.float32)
    )
    path = pathlib.Path(path)
    path.write_bytes(exported.serialize())
    path.with_name(path.name + ".json").write_text(json.dumps(net.metadata, indent=2))
    return {"path": str(path), "bytes": path.stat().st_size, "metadata": str(path.with_name(path.name + ".json"))}


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *, fmt: str = "onnx",
               quantize: str | None = None, which: str = "best") -> dict[str, Any]:
    """``fmt``: onnx | stablehlo; ``quantize``: None | int8 (ONNX only; the float32 model is
    written too, as ``<out>`` with ``.fp32`` before the suffix)."""
    if fmt not in ("onnx", "stablehlo"):
        raise ValueError(f"--format must be onnx or stablehlo, not {fmt!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8 (or absent), not {quantize!r}")
    if quantize and fmt != "onnx":
        raise ValueError("--quantize=int8 is for --format=onnx")
    net = exported_net(workdir, which=which)
    out = pathlib.Path(out)
    if fmt == "stablehlo":
        return to_stablehlo(net, out)
    if not quantize:
        return to_onnx(net, out)
    fp32 = out.with_name(f"{out.stem}.fp32{out.suffix}")
    summary = {"float32": to_onnx(net, fp32)}
    summary["int8"] = quantize_int8(fp32, out, calibration=calibration_windows(workdir))
    return summary
