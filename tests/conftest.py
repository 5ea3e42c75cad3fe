"""Shared fixtures. The real model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model: SmolLM2-135M-Instruct, the
    GGUF's Q4_1 linears dequantized to float32."""
    from lowbit.model.loading import load_pretrained

    model, tok = load_pretrained("default")
    return model, tok


@pytest.fixture(scope="session")
def wikitext_ids(smollm2):
    """WikiText-2 test, joined and tokenized once (protocol of lowbit.eval.data)."""
    from lowbit.eval.data import load_wikitext2_test_text, tokenize_once

    _, tok = smollm2
    return tokenize_once(tok, load_wikitext2_test_text())
