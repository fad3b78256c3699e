"""Serving side of Tuneship: the inference gateway and the Triton model-repository templates."""
