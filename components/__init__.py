"""Kubeflow Pipelines components for MBPO: thin wrappers over ``mbpo_core`` step functions."""

from mbpo_core import __version__

# The project image every component runs in (docker/); override with `mbpo compile --image`.
DEFAULT_IMAGE = f"ghcr.io/mbpo-project/mbpo:{__version__}"
