"""tunelab: from raw conversation data to a fine-tuned, evaluated, merged and served LLM."""

import os

# tunelab never downloads from a model hub: models come from local folders, the offline HF
# cache or the embedded alias. Set before transformers/peft/huggingface_hub are imported, so
# no library quietly tries the network either (HF_HUB_OFFLINE=0 in the environment wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
