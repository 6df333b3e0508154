"""tunelab: from raw conversation data to a fine-tuned, evaluated, merged and served LLM.

`from tunelab import train, evaluate, merge, load_config` (api.py); the names load on first
use, so `import tunelab` stays light. Importing tunelab changes no environment variable:
hub access follows the user's own HF_HUB_OFFLINE (see hub.py).
"""

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "merge", "load_config", "TrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
