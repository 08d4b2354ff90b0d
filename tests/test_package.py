"""Packaging: `import moe` and `import moe.lm.*` are cheap (no Keras), the
public names still resolve, and the layers are registered for loading."""

import pytest
from conftest import run_script

from moe import _lazy


def python(code: str) -> str:
    result = run_script("-c", code, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_importing_the_packages_does_not_load_keras():
    loaded = python(
        "import sys, moe, moe.lm, moe.lm.cli, moe.lm.training.train, "
        "moe.lm.bundle.save_load, moe.lm.serving.server, "
        "moe.lm.text.tokenizer; "
        "print(sorted({'keras', 'tensorflow'} & set(sys.modules)))"
    )
    assert loaded == "[]"


def test_public_names_resolve_on_first_use():
    import moe
    import moe.lm
    from moe.moe_layer import MoELayer

    assert moe.MoELayer is MoELayer
    assert set(moe.__all__) <= set(dir(moe))
    assert moe.lm.NextWordPredictor.__name__ == "NextWordPredictor"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        moe.nothing  # noqa: B018


def test_a_submodule_can_be_a_public_name():
    getattr_, dir_ = _lazy.exports("moe", {"routing": "moe.routing"})
    import moe.routing

    assert getattr_("routing") is moe.routing
    assert "routing" in dir_()


@pytest.mark.parametrize(
    "imports",
    [
        "import keras, moe",
        "import moe, keras",
        "import moe.lm.text.tokenizer, keras",
        # Keras first imported by a layer module, half initialized then.
        "from moe import MoELayer; import keras",
        "from moe.convert import from_transformers; import keras",
    ],
)
def test_the_layers_are_registered_for_loading(imports):
    # A saved MoE model loads without custom_objects: the layers register
    # as soon as both `moe` and Keras are imported, in either order.
    registered = python(
        f"{imports}; print('moe>MoELayer' in keras.saving.get_custom_objects())"
    )
    assert registered == "True"
