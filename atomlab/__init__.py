"""atomlab: build truly open language models, from raw openly licensed text to a released model."""

__version__ = "0.1.0"
