"""Shared fixtures: a tiny knowledge testbed built once per test session in a temporary cache."""

from __future__ import annotations

import pytest
import torch

from memoe.config import load_config
from memoe.pipeline import CONFIG_DIR
from memoe.testbed import TestbedConfig, build_testbed


@pytest.fixture(scope="session", autouse=True)
def cache_for_the_run(tmp_path_factory):
    """Everything memoe caches during the tests (statistics, converted models, corpora) goes to a temporary folder,
    never into the checkout's .cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMOE_CACHE", str(tmp_path_factory.mktemp("memoe-run-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_config() -> TestbedConfig:
    return load_config(TestbedConfig, CONFIG_DIR / "testbed" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("memoe-cache")


@pytest.fixture(scope="session")
def tiny_testbed(tiny_config, tiny_cache):
    torch.set_num_threads(2)
    return build_testbed(tiny_config, cache_dir=tiny_cache, progress=False, verbose=False)
