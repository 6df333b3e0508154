"""tunelab: from raw conversation data to a fine-tuned, evaluated, merged and served LLM."""

__version__ = "0.1.0"
