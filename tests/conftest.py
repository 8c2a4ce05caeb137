"""Shared fixtures: the real Gemma tokenizer with the course template, and a tiny random Gemma model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from utils import chat, models


@pytest.fixture(scope="session")
def tokenizer_dir():
    """Folder of the embedded checkpoint (converted once, then cached)."""
    return models.ensure_embedded_model()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The real Gemma 3 tokenizer with the course's chat template installed (shared: restore what you change)."""
    return chat.setup_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), max_length=128)


def tiny_gemma_config(**overrides) -> Gemma3TextConfig:
    """A 2-layer Gemma 3 with the real 262k vocabulary: seconds to run, same token ids."""
    values = dict(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                  sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    values.update(overrides)
    return Gemma3TextConfig(**values)


@pytest.fixture
def tiny_model():
    """A freshly initialised tiny Gemma (seeded, so tests are repeatable)."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(tiny_gemma_config()).eval()
