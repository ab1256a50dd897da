"""Shared test settings: hypothesis profiles and the torch.ao oracle."""

from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import HealthCheck, settings

# CI runs a fixed, repeatable set of examples; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, print_blob=True)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def torch_ao_reference():
    """PyTorch's reference RNN modules and decomposed quantize ops, or skip the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch.ao.nn.quantized.reference as ao_reference
            import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)
            from torch.ao.nn.quantized.reference.modules import utils as ao_utils
    except Exception as exc:  # any import failure means: no oracle on this install
        pytest.skip(f"torch.ao reference modules do not import: {exc}")
    return ao_reference, ao_utils


@pytest.fixture
def ao():
    return torch_ao_reference()
