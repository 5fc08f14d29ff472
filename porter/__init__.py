"""porter: ports HuggingFace modeling files to the bundled paged-attention, tensor-parallel engine."""

__version__ = "0.1.0"
