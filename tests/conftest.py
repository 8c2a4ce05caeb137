"""Shared fixtures: the real Gemma tokenizer with the course template, and a tiny random Gemma model."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM

from utils import chat, models
from utils.models import tiny_gemma_config
from utils.profiles import get_profile


@pytest.fixture(scope="session")
def tokenizer_dir():
    """Folder of the embedded checkpoint (converted once, then cached)."""
    return models.ensure_embedded_model()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The real Gemma 3 tokenizer with the course's chat template installed (shared: restore what you change)."""
    return chat.setup_tokenizer(models.load_tokenizer(get_profile("cpu")), max_length=128)


@pytest.fixture
def tiny_model():
    """A freshly initialised tiny Gemma (seeded, so tests are repeatable)."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(tiny_gemma_config()).eval()
