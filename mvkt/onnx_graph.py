"""The jaxpr -> ONNX converter behind ``mvkt.export`` (why a converter of its own, and the
primitives it handles: see that module's docstring).

``Converter().run(jaxpr, consts, inputs)`` turns an eval-mode jaxpr into ONNX nodes and
initializers, keeping rank-3 activations in ONNX's ``(N, C, W)`` layout;
``fold_affine_into_conv`` then folds per-channel constants (eval BatchNorm, biases) into
the convolutions.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# The batch size the graph is traced with; it stands for the dynamic batch axis, so it
# must differ from every other dimension of the net (a prime far above any width).
TRACE_BATCH = 1009


class UnsupportedError(NotImplementedError):
    """The net uses a primitive (or a form of one) the ONNX converter does not handle."""


@dataclasses.dataclass
class Tensor:
    name: str
    shape: tuple  # logical (JAX) shape; TRACE_BATCH marks the batch axis
    perm: tuple  # stored axis i holds logical axis perm[i]: (0, 2, 1) for rank 3, identity otherwise


def _stored_perm(rank: int) -> tuple:
    return (0, 2, 1) if rank == 3 else tuple(range(rank))


class Converter:
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

    # Values are np.ndarray (constants, logical layout) or Tensor.

    def to_layout(self, value, like: Tensor) -> str:
        """A constant broadcastable against ``like``, as an initializer in ``like``'s stored layout."""
        c = np.asarray(value, np.float32)
        if c.ndim > len(like.shape):
            raise UnsupportedError(f"constant of shape {c.shape} against a tensor of shape {like.shape}")
        c = c.reshape((1,) * (len(like.shape) - c.ndim) + c.shape)
        return self.const(np.transpose(c, like.perm) if c.ndim == len(like.perm) else c)

    def logical(self, t: Tensor) -> str:
        if t.perm == tuple(range(len(t.perm))):
            return t.name
        inverse = tuple(int(i) for i in np.argsort(t.perm))
        return self.node("Transpose", [t.name], perm=list(inverse))

    def stored(self, name: str, shape: tuple) -> Tensor:
        """A tensor given in logical layout -> the stored layout of its rank."""
        perm = _stored_perm(len(shape))
        if perm != tuple(range(len(shape))):
            name = self.node("Transpose", [name], perm=list(perm))
        return Tensor(name, tuple(shape), perm)

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
            # Constants kept small above are expanded to their traced shapes first: a window
            # reduction of a broadcast constant (XResNet's ceil-mode average-pool divisor) needs
            # the full shape; binding it on the small one gave a (1, 1, 0) divisor.
            full = [np.broadcast_to(x, v.aval.shape) if x.shape != tuple(v.aval.shape) else x
                    for x, v in zip(inputs, eqn.invars)]
            return [np.asarray(out) for out in _as_list(eqn.primitive.bind(*full, **params))]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        handler = getattr(self, f"_{name}", None)
        if handler is None:
            raise UnsupportedError(f"primitive {name!r} is not supported by the ONNX export")
        return [handler(inputs, params, out_shape)]

    # ---- elementwise

    def _binary(self, op: str, inputs: list, out_shape: tuple):
        a, b = inputs
        like = a if isinstance(a, Tensor) else b
        names = []
        for x in (a, b):
            if isinstance(x, Tensor):
                if x.perm != like.perm:
                    raise UnsupportedError(f"{op} of tensors in different layouts")
                names.append(x.name)
            else:
                names.append(self.to_layout(x, like))
        # Constants never outrank their tensor (to_layout refuses), so the result keeps its layout.
        return Tensor(self.node(op, names), out_shape, like.perm)

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
            if isinstance(tensor, Tensor) and isinstance(other, np.ndarray) and other.size == 1 and float(other) == 0:
                return Tensor(self.node("Relu", [tensor.name]), tensor.shape, tensor.perm)
        return self._binary("Max", inputs, out_shape)

    def _min(self, inputs, params, out_shape):
        return self._binary("Min", inputs, out_shape)

    def _unary(self, op: str, inputs: list):
        (x,) = inputs
        return Tensor(self.node(op, [x.name]), x.shape, x.perm)

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
        return Tensor(self.node("Reciprocal", [self.node("Sqrt", [x.name])]), x.shape, x.perm)

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
        if not isinstance(x, Tensor) or not isinstance(w, np.ndarray) or w.ndim != 3:
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
        return Tensor(out, out_shape, x.perm)

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
            return Tensor(self.node("MaxPool", [x.name], **attrs), out_shape, x.perm)
        mean = self.node("AveragePool", [x.name], count_include_pad=1, **attrs)
        return Tensor(self.node("Mul", [mean, self.const(np.float32(dims[1]))]), out_shape, x.perm)

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
        return self.stored(out, out_shape) if len(out_shape) == 3 else Tensor(out, out_shape, _stored_perm(len(out_shape)))

    def _reduce_max(self, inputs, params, out_shape):
        return self._reduce("ReduceMax", inputs, params, out_shape)

    def _reduce_sum(self, inputs, params, out_shape):
        return self._reduce("ReduceSum", inputs, params, out_shape)

    def _concatenate(self, inputs, params, out_shape):
        if not all(isinstance(x, Tensor) for x in inputs) or len({x.perm for x in inputs}) != 1:
            raise UnsupportedError("concatenate of constants or of tensors in different layouts")
        perm = inputs[0].perm
        axis = perm.index(int(params["dimension"]))
        return Tensor(self.node("Concat", [x.name for x in inputs], axis=axis), out_shape, perm)

    def _dot_general(self, inputs, params, out_shape):
        x, w = inputs
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if not isinstance(w, np.ndarray) or len(x.shape) != 2 or w.ndim != 2 or tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb:
            raise UnsupportedError("dot_general other than (batch, features) @ (features, outputs) weights")
        return Tensor(self.node("MatMul", [x.name, self.const(w, "dense_w")]), out_shape, x.perm)

    def _reshape_to(self, x: Tensor, out_shape: tuple) -> Tensor:
        shape = [-1 if d == TRACE_BATCH else int(d) for d in out_shape]
        if out_shape and out_shape[0] != TRACE_BATCH:
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


def fold_affine_into_conv(nodes: list, initializers: dict) -> list:
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
