"""pallax: JAX/Pallas kernels, sharding and models for efficient LLMs."""

__version__ = "0.1.0"
