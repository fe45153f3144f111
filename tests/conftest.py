"""Shared fixtures for pyllm's Python tests.

* torch is seeded before every test (results do not depend on test order);
* hypothesis gets a modest, deadline-free profile ("pyllm"; HYPOTHESIS_PROFILE=thorough
  runs more examples);
* `tests/` is importable so test modules can `from helpers import ...`.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "pyllm", max_examples=25, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("thorough", max_examples=300, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pyllm"))
except ImportError:  # hypothesis is a test dependency; test_properties.py skips without it
    pass

import pyllm  # noqa: E402  (after sys.path set-up)
from pyllm import _ext  # noqa: E402

EMU_SKIP_REASON = "pyllm._C_emu not built (PYLLM_EMULATED=0)"


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def backend_name() -> str:
    """The backend the session runs under (PYLLM_BACKEND, default 'auto')."""
    return pyllm.current_backend()


def native_active() -> bool:
    """True when ops in this session run the native CPU kernels (not the reference)."""
    return _ext.HAS_C and pyllm.current_backend() in ("auto", "native")


def pytest_collection_modifyitems(config, items):
    if _ext.HAS_EMU:
        return
    reason = EMU_SKIP_REASON
    if _ext.C_EMU_ERROR and _ext.C_EMU_ERROR.startswith("disabled"):
        reason = f"pyllm._C_emu {_ext.C_EMU_ERROR}"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "emulated" in item.keywords:
            item.add_marker(skip)
