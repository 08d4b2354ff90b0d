"""Data-parallel training with `tf.distribute` (`model.py --strategy`).

- `"none"`: Keras's default, one device.
- `"mirrored"`: `tf.distribute.MirroredStrategy` over this machine's
  accelerators (every GPU), else over its logical CPU devices (usually one).
- `"multi-worker"`: `tf.distribute.MultiWorkerMirroredStrategy` across the
  machines listed in the `TF_CONFIG` environment variable, each running the
  same `python model.py` command with its own task.

Every replica holds a full copy of the model; each step splits one global
batch (`--batch-size` pairs) evenly over all replicas of all workers and
all-reduces the gradients, so the update is the one a single device makes
on the whole batch. TensorFlow backend only: Keras's other backends have
their own engine, `keras.distribution` (see `moe.distribution`).
"""

import contextlib
import dataclasses
import json
import os

from moe.lm.errors import StrategyError

STRATEGIES = ("none", "mirrored", "multi-worker")
# Jobs MultiWorkerMirroredStrategy runs; "ps" and "evaluator" tasks belong to
# other strategies or to a side-car evaluator, not to this training loop.
_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process's place in a `TF_CONFIG` cluster.

    Attributes:
        job: `"chief"` or `"worker"`.
        index: index of this task within its job.
        num_workers: tasks in the cluster, chief included.
        is_chief: whether this task writes the model (the `"chief"` task,
            or worker 0 when the cluster has no chief).
    """

    job: str
    index: int
    num_workers: int
    is_chief: bool


def parse_tf_config(value: str | None) -> ClusterTask:
    """Validates a `TF_CONFIG` value for `MultiWorkerMirroredStrategy`.

    A valid value names every task's `host:port` and this task, e.g.
    `{"cluster": {"worker": ["host1:12345", "host2:12345"]},
    "task": {"type": "worker", "index": 0}}`; a `"chief"` job of one
    address may be added.

    Args:
        value: the `TF_CONFIG` text, or `None` when it is not set.

    Returns:
        The `ClusterTask` of this process.

    Raises:
        StrategyError: `value` is missing or is not such a configuration;
            the message says what to fix.
    """
    example = (
        'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
        '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\''
    )
    if not value or not value.strip():
        raise StrategyError(
            "--strategy multi-worker needs the TF_CONFIG environment "
            f"variable to describe the cluster and this task, {example}"
        )
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise StrategyError(
            f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}); "
            f"{example}"
        ) from None
    if not isinstance(config, dict):
        raise StrategyError(f"TF_CONFIG must be a JSON object; {example}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise StrategyError(
            'TF_CONFIG has no "cluster" object listing the workers\' '
            f"host:port addresses; {example}"
        )
    other = sorted(set(cluster) - set(_JOBS))
    if other:
        raise StrategyError(
            f"TF_CONFIG's cluster has job(s) {', '.join(other)}; "
            "--strategy multi-worker runs only 'chief' and 'worker' tasks"
        )
    if "worker" not in cluster and "chief" not in cluster:
        raise StrategyError(
            f'TF_CONFIG\'s cluster lists no "worker" (or "chief"); {example}'
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(_is_address(a) for a in addresses)
        ):
            raise StrategyError(
                f'TF_CONFIG\'s cluster "{job}" must be a non-empty list of '
                f'"host:port" strings. Received: {json.dumps(addresses)}'
            )
    if len(cluster.get("chief", [])) > 1:
        raise StrategyError(
            'TF_CONFIG\'s cluster may have one "chief" at most. Received: '
            f"{json.dumps(cluster['chief'])}"
        )
    addresses = [a for job in _JOBS for a in cluster.get(job, [])]
    if len(set(addresses)) != len(addresses):
        raise StrategyError(
            "TF_CONFIG's cluster lists an address twice; each task needs "
            f"its own host:port. Received: {json.dumps(addresses)}"
        )
    if not isinstance(task, dict):
        raise StrategyError(
            'TF_CONFIG has no "task" object saying which task this process '
            'is, e.g. "task": {"type": "worker", "index": 0}'
        )
    job, index = task.get("type"), task.get("index")
    if job not in cluster:
        raise StrategyError(
            f"TF_CONFIG's task type {json.dumps(job)} is not a job of its "
            f"cluster ({', '.join(sorted(cluster))})"
        )
    size = len(cluster[job])
    if isinstance(index, bool) or not isinstance(index, int):
        raise StrategyError(
            f"TF_CONFIG's task index must be an integer in [0, {size}). "
            f"Received: {json.dumps(index)}"
        )
    if not 0 <= index < size:
        raise StrategyError(
            f'TF_CONFIG\'s task index {index} is out of range: job "{job}" '
            f"has {size} task(s), indices 0 to {size - 1}"
        )
    is_chief = job == "chief" or ("chief" not in cluster and index == 0)
    return ClusterTask(job, index, len(addresses), is_chief)


def _is_address(address) -> bool:
    if not isinstance(address, str):
        return False
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def check_strategy(name: str, environ=None) -> ClusterTask | None:
    """Checks that strategy `name` can run; cheap (no TensorFlow).

    Returns:
        This process's `ClusterTask` for `"multi-worker"`, else `None`.

    Raises:
        StrategyError: an unknown name or a bad `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise StrategyError(
            f"--strategy must be one of {', '.join(STRATEGIES)}. "
            f"Received: {name}"
        )
    if name != "multi-worker":
        return None
    environ = os.environ if environ is None else environ
    return parse_tf_config(environ.get("TF_CONFIG"))


def make_strategy(name: str):
    """The `tf.distribute.Strategy` for `name` (`None` for `"none"`).

    Create it before building the model, and build and compile the model in
    its `scope()`; `model.fit` then distributes the `tf.data` batches.

    Raises:
        StrategyError: not the TensorFlow backend, or a bad `TF_CONFIG`.
    """
    check_strategy(name)
    if name == "none":
        return None
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise StrategyError(
            f"--strategy {name} uses tf.distribute, which needs the "
            f"TensorFlow backend, not {backend}: set KERAS_BACKEND="
            "tensorflow. On JAX, "
            "moe.distribution.expert_parallel() shards experts over devices"
        )
    import tensorflow as tf

    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or (
            tf.config.list_logical_devices("CPU")
        )
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    try:
        return _multi_worker_strategy_class()()
    except RuntimeError as e:  # "must be configured at program startup"
        raise StrategyError(
            "--strategy multi-worker: make the strategy at program start, "
            f"before TensorFlow sets up its devices ({e})"
        ) from None


def distribute_options(dataset):
    """`dataset` set to be sharded across workers by batch.

    The pipeline holds target positions, not files, so each worker runs it
    whole and keeps its share of every global batch (`DATA` auto-sharding,
    stated outright so TensorFlow does not first try, and log failing, to
    shard by file).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def whole_batches(dataset, num_examples: int, batch_size: int):
    """The training `dataset` without its last, partial batch.

    Under a strategy every step splits one global batch over the replicas.
    A partial last batch would give them unequal shares, and the
    embedding's sparse gradients, all-gathered across replicas, must have
    the same shape on each (TensorFlow aborts the collective otherwise).
    Shuffling changes which examples wait for the next epoch.

    Args:
        num_examples: examples (pairs or windows) in the epoch, or the
            fewest an epoch has when it varies: every epoch then takes
            `num_examples // batch_size` steps, a number known in advance.

    Raises:
        StrategyError: fewer than `batch_size` examples.
    """
    import tensorflow as tf

    steps = num_examples // batch_size
    if steps == 0:
        raise StrategyError(
            f"--batch-size {batch_size} is more than the {num_examples} "
            "training examples; a distributed step needs one whole global "
            "batch: lower --batch-size"
        )
    whole = dataset.take(steps)
    return whole.apply(tf.data.experimental.assert_cardinality(steps))


def scope(strategy):
    """`strategy.scope()`, or a no-op context without a strategy."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def describe(strategy, task: ClusterTask | None) -> dict:
    """What `training.json` records about the distribution of a run."""
    if strategy is None:
        return {"strategy": "none", "replicas": 1, "workers": 1, "chief": True}
    name = "mirrored" if task is None else "multi-worker"
    where = {
        "strategy": name,
        "replicas": strategy.num_replicas_in_sync,
        "workers": 1 if task is None else task.num_workers,
        "chief": True if task is None else task.is_chief,
    }
    if task is not None:
        where["task"] = f"{task.job} {task.index}"
    return where


def _multi_worker_strategy_class():
    import tensorflow as tf

    base = tf.distribute.MultiWorkerMirroredStrategy

    class MultiWorkerMirroredStrategy(base):
        """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3's
        `fit` gives it (keras-team/keras#20585).

        Keras reduces a whole `(x, y)` batch with one call to learn its
        shapes, and each scalar metric with `axis=0`; only
        `MirroredStrategy` accepts either. Here nested values are reduced
        leaf by leaf, and a scalar across replicas only.
        """

        def reduce(self, reduce_op, value, axis=None):
            def leaf(v):
                local = self.experimental_local_results(v)[0]
                scalar = axis is not None and local.shape.rank == 0
                return base.reduce(self, reduce_op, v, None if scalar else axis)

            return tf.nest.map_structure(leaf, value)

    return MultiWorkerMirroredStrategy
