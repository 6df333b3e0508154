"""tunelab: from raw conversation data to a fine-tuned, evaluated, merged and served LLM.

`from tunelab import train, evaluate, merge, load_config` is the Python API (api.py); the names
load on first use, so `import tunelab` stays light. Importing tunelab changes no environment
variable: hub access follows the user's own HF_HUB_OFFLINE (see hub.py).
"""

import importlib
import types

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "merge", "load_config", "TrainResult", "EvalResult"]
STAGE_ENTRIES = ("train", "evaluate")  # API functions that share their name with a stage package


class StageEntry(types.ModuleType):
    """A stage package that is also its API function. `tunelab.train` is a package (its modules
    stay where they are: tunelab.train.loop), and Python binds that package to the name
    `tunelab.train` as soon as it is imported, so the function cannot hold the name: instead
    calling the package runs `tunelab.api.train` (likewise `evaluate`)."""

    def __call__(self, *args, **kwargs):
        from tunelab import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def __getattr__(name: str):
    if name in STAGE_ENTRIES:
        return importlib.import_module(f"tunelab.{name}")
    if name in __all__:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
