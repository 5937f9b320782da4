"""Shared fixtures: the reference implementation's tiny golden weights and outputs."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    return json.loads((FIXTURES / "tiny_arch.json").read_text())


@pytest.fixture(scope="session")
def tiny_weights() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(FIXTURES / "tiny_v1_weights.safetensors").items()}


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "tiny_v1_io.safetensors")
