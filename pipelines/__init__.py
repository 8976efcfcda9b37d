"""The MBPO pipeline, its drivers (local, cluster) and the ``mbpo`` command line."""
