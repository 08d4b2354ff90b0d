"""Public names imported on first use (PEP 562), for `moe` and `moe.lm`.

Importing Keras imports its backend (TensorFlow), which takes seconds; a
package whose `__init__` imported its layers eagerly would make every
`import moe.lm.x` pay for it, even where no layer is needed.
"""

import importlib
import importlib.abc
import importlib.util
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


def call_after_import(module_name: str, callback) -> None:
    """Runs `callback()` once `module_name` is imported (now, if it is).

    `moe` uses it to register its layers with Keras whichever of the two is
    imported first, so that `keras.saving.load_model` finds them without
    `custom_objects` and `import moe` alone still does not load Keras.
    """
    if sys.modules.get(module_name) is not None:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(module_name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `module_name` with the other finders, then runs `callback`
    when its module has finished executing."""

    def __init__(self, module_name, callback):
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, name, path=None, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)  # once; the other finders find it
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_call(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_call
        return spec
