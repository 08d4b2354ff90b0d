"""Per-expert load during training, on every Keras backend.

`MoELayer` logs `<name>_load_<e>` as layer metrics, but Keras cannot update
metrics owned by a layer inside `fit` on JAX (keras-team/keras#21639), so
those are missing there. `ExpertLoadCallback` measures the load itself with
the layers' `route()` (inference routing) on a fixed sample of validation
contexts, before training and at each epoch end — the same measurement on
every backend, comparable across epochs because the sample does not change.
"""

import keras
import numpy as np

from moe.lm.model.explain import ExplainedModel
from moe.lm.model.routed_layers import experts_of


def expert_load(routes: list[dict], num_experts: list[int]) -> list[list]:
    """Fraction of the kept (position, expert) pairs going to each expert.

    Args:
        routes: one `route()` dict per routed layer (NumPy), any batch shape.
        num_experts: the experts of each layer.

    Returns:
        One list of `num_experts` fractions per layer (sums to 1; all 0 if
        nothing was kept).
    """
    loads = []
    for route, experts in zip(routes, num_experts, strict=True):
        chosen = np.asarray(route["expert_indices"])[np.asarray(route["kept"])]
        counts = np.bincount(chosen.ravel(), minlength=experts)[:experts]
        total = counts.sum()
        loads.append((counts / total if total else counts * 0.0).tolist())
    return loads


class ExpertLoadCallback(keras.callbacks.Callback):
    """Records the per-expert load of every routed layer during `fit`.

    Args:
        contexts: int32 `(n, max_seq_len)`, a fixed sample of validation
            contexts (a few hundred to a few thousand).
        log_dir: optional TensorBoard directory: the loads are also written
            as scalars `expert_load/<layer>/<expert>` (step = epoch) to
            `<log_dir>/expert_load`.

    Attributes:
        layer_names: the routed layers, input side first.
        history: `{layer: [[load per expert], ...]}`, one entry before
            training (epoch 0) and one per finished epoch.
        final: `{layer: [load per expert]}` after training, with the weights
            `fit` ends with (e.g. restored by `EarlyStopping` listed
            earlier).

    Example:
        callback = ExpertLoadCallback(val_contexts)
        model.fit(..., callbacks=[callback])
        callback.history["moe"][-1]  # [0.26, 0.24, 0.27, 0.23]
    """

    def __init__(self, contexts, log_dir: str | None = None):
        super().__init__()
        self.contexts = np.asarray(contexts, np.int32)
        self.log_dir = log_dir
        self.layer_names: list[str] = []
        self.history: dict[str, list] = {}
        self.final: dict[str, list] = {}
        self._explained = None
        self._writer = None

    def measure(self) -> list[list]:
        """The current load of each routed layer on the sample."""
        if self._explained is None:
            self._explained = ExplainedModel(self.model, positions="all")
            self.layer_names = self._explained.layer_names
            self._experts = [experts_of(la) for la in self._explained.routed]
        _, routes = self._explained.predict_on_batch(self.contexts)
        routes = keras.tree.map_structure(keras.ops.convert_to_numpy, routes)
        return expert_load(routes, self._experts)

    def _record(self, step: int) -> None:
        loads = self.measure()
        for name, load in zip(self.layer_names, loads, strict=True):
            self.history.setdefault(name, []).append(load)
        if self.log_dir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                f"{self.log_dir}/expert_load"
            )
        with self._writer.as_default(step=step):
            for name, load in zip(self.layer_names, loads, strict=True):
                for expert, value in enumerate(load):
                    tf.summary.scalar(f"expert_load/{name}/{expert}", value)
        self._writer.flush()

    def on_train_begin(self, logs=None):
        self._record(0)

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch + 1)

    def on_train_end(self, logs=None):
        loads = self.measure()
        self.final = dict(zip(self.layer_names, loads, strict=True))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
