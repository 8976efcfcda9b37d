"""Loaded by every Python process started with this folder on PYTHONPATH (pipeline drivers, the
warm step server, kfp.local's task processes): with ``MBPO_TEST_DIVERGE_AT_ROWS`` set, the SAC
update diverges from that replay size on. Test-only; the library has no fault hooks.

The patch is applied when ``mbpo_core.steps`` is first imported, not here: importing it at start-up
would import MuJoCo in every process, and glfw's start-up probe is itself a Python subprocess.
"""

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "mbpo_core.steps"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001,ANN201
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):  # noqa: ANN001,ANN202
            exec_module(module)
            from tests.faultinject.diverge import diverging

            module.update_sac = diverging(module.update_sac,
                                          int(os.environ["MBPO_TEST_DIVERGE_AT_ROWS"]))
        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("MBPO_TEST_DIVERGE_AT_ROWS"):
    sys.meta_path.insert(0, _PatchOnImport())
