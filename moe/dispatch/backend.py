"""The dispatch seam: the one place outside `keras.ops` that asks or calls a
backend directly (static-shape tracing, accelerators, dynamic splits,
grouped matmuls). `keras.ops` has none of these."""

import keras
from keras import ops


def shapes_must_be_static(x):
    """Whether `x` is being traced by a compiler that needs static shapes.

    JAX does while tracing (`jit`, `grad`, `eval_shape`: `x` is a tracer);
    TensorFlow inside an XLA (`jit_compile=True`) function; PyTorch under
    `torch.compile`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        graph = tf.compat.v1.get_default_graph()
        return control_flow_util.GraphOrParentsInXlaContext(graph)
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        return torch.compiler.is_compiling()
    return True


def has_values(x):
    """Whether `x`'s values exist now (eager), so that reading them costs a
    copy to the host and nothing more; `False` while a graph or compiler
    traces `x` (a TensorFlow graph, JAX tracing, `torch.compile`, PyTorch's
    symbolic "meta" tensors), where reading values would add ops to the
    compiled program or fail. Checks of values run only where this holds.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        device = getattr(x, "device", None)  # None: a NumPy array
        return not torch.compiler.is_compiling() and (
            device is None or device.type != "meta"
        )
    return True


def has_grouped_matmul():
    """Whether the backend has a grouped matmul (JAX, PyTorch)."""
    return keras.backend.backend() in ("jax", "torch")


def on_accelerator(x):
    """Whether `x` lives on (JAX: will run on) a GPU or TPU."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    if backend == "torch":
        return x.device.type not in ("cpu", "meta")
    return False


def split_rows(x, sizes, num):
    """`x` cut into `num` consecutive groups of `sizes` rows.

    `keras.ops.split` needs a static row count, which a TensorFlow graph
    may not have.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.split(x, sizes, num=num, axis=0)
    return ops.split(x, ops.cumsum(sizes)[:-1], axis=0)


def grouped_matmul(x, kernels, group_sizes):
    """`(rows, d) x (groups, d, h) -> (rows, h)`: rows of group `g` (laid
    end to end, `group_sizes` int32 `(groups,)` summing to `rows`) times
    `kernels[g]`.

    JAX: `jax.lax.ragged_dot`. PyTorch: `torch._grouped_mm` (its CPU
    kernel has no autograd and wants 16-byte aligned rows, so a custom
    autograd function runs the three grouped products, and unaligned
    widths fall back to one matmul per group). TensorFlow has none: one
    matmul per group on a dynamic split.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.lax.ragged_dot(x, kernels, group_sizes.astype("int32"))
    if backend == "torch":
        return _torch_grouped_matmul(x, kernels, group_sizes)
    num = kernels.shape[0]
    groups = split_rows(x, group_sizes, num)
    kernels = ops.unstack(kernels, axis=0)
    return ops.concatenate(
        [ops.matmul(g, w) for g, w in zip(groups, kernels)], axis=0
    )


def _torch_grouped_matmul(x, kernels, group_sizes):
    import torch

    aligned = x.shape[-1] % 4 == 0 and kernels.shape[-1] % 4 == 0
    if not (hasattr(torch, "_grouped_mm") and aligned):
        sizes = [int(s) for s in group_sizes.tolist()]
        groups = torch.split(x, sizes, dim=0)
        return torch.cat([g @ w for g, w in zip(groups, kernels)], dim=0)
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
    return _TorchGroupedMM.apply(x.contiguous(), kernels.contiguous(), offsets)


def _torch_grouped_mm_function():
    import torch

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernels, offsets):
            ctx.save_for_backward(x, kernels, offsets)
            return torch._grouped_mm(x, kernels, offs=offsets)

        @staticmethod
        def backward(ctx, grad):
            x, kernels, offsets = ctx.saved_tensors
            grad = grad.contiguous()
            dx = dk = None
            if ctx.needs_input_grad[0]:
                dx = torch._grouped_mm(
                    grad, kernels.transpose(1, 2).contiguous(), offs=offsets
                )
            if ctx.needs_input_grad[1]:
                # (d, rows) x (rows, h) cut along rows: one (d, h) a group.
                dk = torch._grouped_mm(x.t(), grad, offs=offsets)
            return dx, dk, None

    return GroupedMM


class _LazyFunction:
    # Builds the autograd function on first use: torch loads only then.
    def __init__(self, make):
        self._make, self._fn = make, None

    def apply(self, *args):
        if self._fn is None:
            self._fn = self._make()
        return self._fn.apply(*args)


_TorchGroupedMM = _LazyFunction(_torch_grouped_mm_function)
