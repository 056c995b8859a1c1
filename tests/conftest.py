"""Shared fixtures: a tiny knowledge testbed built once per test session in a temporary cache, and a fresh copy of
its model for every test that uses it (a test that edits the model, or fails half-way through an edit, cannot leave
its changes to the next one)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from memoe.config import load_config
from memoe.resources import config_root
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
    return load_config(TestbedConfig, config_root() / "testbed" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("memoe-cache")


@pytest.fixture(scope="session")
def tiny_testbed_built(tiny_config, tiny_cache):
    torch.set_num_threads(2)
    return build_testbed(tiny_config, cache_dir=tiny_cache, progress=False, verbose=False)


@pytest.fixture
def tiny_testbed(tiny_testbed_built):
    """The tiny testbed with a fresh copy of its model (milliseconds for its ~0.5M parameters)."""
    return dataclasses.replace(tiny_testbed_built, model=copy.deepcopy(tiny_testbed_built.model))
