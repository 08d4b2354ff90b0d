"""The contract every layer of `moe` keeps, checked in one place.

In the spirit of Keras's own `run_layer_test`: `check_layer_contract` builds
a functional model around a fresh layer and checks
- the config round trip (`from_config(get_config())`) of the layer and of
  every sublayer (routers, experts, gating networks);
- the `.keras` round trip in safe mode: equal outputs after reloading;
- one training step: a finite loss, and every trainable weight moves;
- masks: values at masked positions change no output at real positions.
"""

import keras
import numpy as np
from keras import ops

import moe


def to_numpy(x):
    return ops.convert_to_numpy(x)


def _model(layer, inputs, call_args, output_fn):
    """A functional model: `inputs` (and each `call_args` array, passed by
    keyword) -> `output_fn(layer(...))`."""
    main = keras.Input(inputs.shape[1:], dtype=str(inputs.dtype), name="x")
    extra = {
        name: keras.Input(a.shape[1:], dtype=str(a.dtype), name=name)
        for name, a in call_args.items()
    }
    outputs = layer(main, **extra)
    if output_fn is not None:
        outputs = output_fn(outputs)
    return keras.Model([main, *extra.values()], outputs)


def check_layer_contract(
    make_layer,
    inputs,
    call_args=None,
    output_fn=None,
    mask=None,
    untrained=(),
    tmp_path=None,
):
    """Check the layer contract; returns the outputs of the trained model.

    Args:
        make_layer: `() -> layer`, a fresh, unbuilt layer each call.
        inputs: NumPy array, the layer's first argument (batch first).
        call_args: dict `name -> array` of further call arguments passed by
            keyword (e.g. `routing_key`, `mask`, `padding_mask`).
        output_fn: maps the layer's output (e.g. a dict) to one tensor.
        mask: name of the bool entry of `call_args` that masks positions
            (for the padding check), or `None`.
        untrained: substrings of weight paths allowed not to move in the
            training step (e.g. experts no input chose).
        tmp_path: a directory for the `.keras` file.
    """
    call_args = dict(call_args or {})
    data = [inputs, *call_args.values()]

    # Config round trip, the layer and each sublayer.
    layer = make_layer()
    model = _model(layer, inputs, call_args, output_fn)
    for part in layer._flatten_layers(include_self=True):
        clone = type(part).from_config(part.get_config())
        assert clone.get_config() == part.get_config(), part.name

    # `.keras` round trip (safe mode, with and without custom_objects).
    want = to_numpy(model.predict_on_batch(data))
    path = tmp_path / f"{layer.name}.keras"
    model.save(path)
    for custom_objects in (None, moe.custom_objects()):
        loaded = keras.saving.load_model(
            path, custom_objects=custom_objects, safe_mode=True
        )
        got = to_numpy(loaded.predict_on_batch(data))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Masks: what padded positions hold changes nothing real.
    if mask is not None:
        real = np.asarray(call_args[mask], bool)
        padded = inputs.copy()
        padded[~real] = 7.0
        changed = [padded, *call_args.values()]
        got = to_numpy(model.predict_on_batch(changed))
        np.testing.assert_allclose(got[real], want[real], atol=1e-5)

    # One training step moves every trainable weight.
    before = {w.path: to_numpy(w) for w in model.trainable_weights}
    model.compile(keras.optimizers.SGD(0.1), "mse")
    target = np.ones_like(want)
    loss = model.train_on_batch(data, target, return_dict=True)["loss"]
    assert np.isfinite(loss), loss
    for weight in model.trainable_weights:
        if any(part in weight.path for part in untrained):
            continue
        assert not np.array_equal(to_numpy(weight), before[weight.path]), (
            f"{weight.path} did not train"
        )
    return to_numpy(model.predict_on_batch(data))
