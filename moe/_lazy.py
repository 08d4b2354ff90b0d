"""Public names imported on first use (PEP 562), for `moe` and `moe.lm`.

Importing Keras imports its backend (TensorFlow), which takes seconds; a
package whose `__init__` imported its layers eagerly would make every
`import moe.lm.x` pay for it, even where no layer is needed.
"""

import importlib
import sys


def exports(package: str, public: dict[str, str]):
    """`__getattr__` and `__dir__` for `package`'s `public` names.

    Args:
        package: the package's `__name__`.
        public: `{name: module that defines it}`; a submodule of the
            package is its own entry (`{"routers": "moe.routers"}`).

    Example (in a package's `__init__.py`):
        __getattr__, __dir__ = exports(__name__, {"MoELayer": "moe.moe_layer"})
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name):
        module = public.get(name)
        if module is None:
            raise AttributeError(
                f"module {package!r} has no attribute {name!r}"
            )
        value = importlib.import_module(module)
        if module != f"{package}.{name}":  # a name defined in `module`
            value = getattr(value, name)
        namespace[name] = value  # found directly next time
        return value

    def __dir__():
        return sorted({*namespace, *public})

    return __getattr__, __dir__
