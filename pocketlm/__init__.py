"""pocketlm: run, shrink, specialize and evaluate small language models on a CPU.

    import pocketlm
    lm = pocketlm.load("smollm2")
    print(lm.generate("Hi"))

`import pocketlm` alone imports no torch: `load` and `LM` come from pocketlm/api.py when first used.
"""

import sys
import types

__version__ = "0.1.0"
__all__ = ["load", "LM"]


# `pocketlm.load` is two things: the submodule pocketlm/load.py (pocketlm.load.load, LoadedModel, ...: what the
# library and its users import) and the three-line API's function. Python sets the package attribute `load` to the
# submodule whenever that is imported, which would shadow a function of that name, so instead the submodule itself
# is made callable: calling it calls pocketlm.api.load. Making a module callable by giving it a ModuleType subclass
# is what the language reference offers for customizing a module ("Customizing module attribute access").


class _CallableLoadModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """pocketlm.load(model="smollm2-135m-instruct", *, quant="auto", ...) -> pocketlm.LM: see pocketlm.api.load."""
        from pocketlm.api import load

        return load(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name == "load" and type(value) is types.ModuleType:  # the import system binding the submodule
            value.__class__ = _CallableLoadModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "load":  # pocketlm/load.py, not imported yet: importing it binds it here (callable, above)
        import importlib

        return importlib.import_module("pocketlm.load")
    if name in ("LM", "Stream"):
        from pocketlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
