"""Fixtures of the engine-replica tests: a real local Ray cluster per test module."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module; its address, for servers that join it.

    NOTE: 4 logical CPUs on a 2-core box: Ray's CPUs are only bookkeeping here; the tests'
    replicas take half a CPU each. SHOAL_TEST_HOOKS lets a test freeze a replica's engine
    loop (serving/replicas/actor.py); no server outside the tests sets it.
    """
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "SHOAL_TEST_HOOKS": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
