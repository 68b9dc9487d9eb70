"""IMG Lightning: training, feature caching and evaluation for Implicit Multimodal Guidance."""

__version__ = "0.1.0"
