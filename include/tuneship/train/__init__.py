"""LoRA fine-tuning: validated YAML recipes and one resumable trainer entrypoint.

`python -m tuneship.train --recipe R --data DIR --base REF --output OUT` is the same command in
the local subprocess, the Docker container and the Kubernetes pod. Importing this package is
cheap (no torch); the heavy imports happen when training starts.
"""

from __future__ import annotations

from tuneship.train.recipe import (
    Recipe,
    RecipeError,
    default_recipe_path,
    load_recipe,
    recipe_hash,
)

__all__ = ["Recipe", "RecipeError", "default_recipe_path", "load_recipe", "recipe_hash"]
