"""MBPO (Janner et al., 2019) as a library: dynamics ensemble, SAC, replay, steps and trainer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mbpo")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
