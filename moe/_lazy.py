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


def call_after_import(module_name: str, callback, package: str) -> None:
    """Runs `callback()` once `module_name` is imported (now, if it is).

    `moe` uses it to register its layers with Keras whichever of the two is
    imported first, so that `keras.saving.load_model` finds them without
    `custom_objects` and `import moe` alone still does not load Keras.

    When `module_name` is first imported by a module of `package` (`moe`'s
    layers import Keras), `callback` waits until no module of `package` is
    still executing: it imports those modules, which cannot be done while
    they are half initialized.
    """
    if sys.modules.get(module_name) is not None:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(module_name, callback, package))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `module_name` and `package`'s modules with the other finders
    and wraps their loaders: `callback` runs when `module_name` has finished
    executing and no module of `package` is executing."""

    def __init__(self, module_name, callback, package):
        self.module_name = module_name
        self.callback = callback
        self.prefix = package + "."
        self.executing = 0  # modules of `package` executing now
        self.imported = False  # `module_name` has been imported

    def find_spec(self, name, path=None, target=None):
        if name != self.module_name and not name.startswith(self.prefix):
            return None
        spec = self._find_with_others(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        if name == self.module_name:

            def exec_then_call(module):
                exec_module(module)
                self.imported = True
                self._call_when_ready()

        else:

            def exec_then_call(module):
                self.executing += 1
                try:
                    exec_module(module)
                finally:
                    self.executing -= 1
                self._call_when_ready()

        spec.loader.exec_module = exec_then_call
        return spec

    def _find_with_others(self, name, path, target):
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def _call_when_ready(self):
        if self.imported and not self.executing and self in sys.meta_path:
            sys.meta_path.remove(self)  # once
            self.callback()
