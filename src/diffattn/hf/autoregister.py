"""Register diffattn with transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` on ``import diffattn``.

Importing transformers' model classes takes seconds, which ``import diffattn`` (and every
``diffattn`` command) must not pay. So :func:`install` registers at once only when transformers'
auto modules are already imported; otherwise it adds a post-import hook (a ``sys.meta_path``
finder, PEP 451) that registers the config when ``transformers.models.auto.configuration_auto``
finishes loading and the model when ``...modeling_auto`` does — i.e. exactly when a user first
touches ``AutoConfig`` or ``AutoModelForCausalLM``. A failure there is reported as a warning and never
breaks the import of transformers. :func:`register` does the same explicitly (idempotent).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration import MODEL_TYPE, DiffAttnConfig

    AutoConfig.register(MODEL_TYPE, DiffAttnConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from .configuration import DiffAttnConfig
    from .modeling import DiffAttnForCausalLM

    register_config()
    AutoModelForCausalLM.register(DiffAttnConfig, DiffAttnForCausalLM, exist_ok=True)


def register() -> None:
    """Register DiffAttnConfig / DiffAttnForCausalLM with the transformers Auto classes now."""
    register_config()
    register_model()


_HOOKS = {CONFIG_AUTO: register_config, MODEL_AUTO: register_model}


def _run_hook(name: str) -> None:
    try:
        _HOOKS[name]()
    except Exception as e:  # never break `import transformers` because of us
        warnings.warn(f"diffattn: could not register with transformers ({type(e).__name__}: {e}); "
                      f"call diffattn.hf.register() to see the error", RuntimeWarning, stacklevel=2)


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_hook(self._name)

    def __getattr__(self, item):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Register now for auto modules already imported; hook the others (called by ``import diffattn``)."""
    for name in (CONFIG_AUTO, MODEL_AUTO):
        if name in sys.modules:
            _run_hook(name)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
