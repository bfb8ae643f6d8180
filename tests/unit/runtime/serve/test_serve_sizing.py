"""The default context length fits the KV cache in memory (pure arithmetic, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kubeforge_runtime.serve.service import KV_MEMORY_FRACTION, kv_bytes_per_token, memory_fitted_length

# SmolLM2-135M-Instruct: 30 layers, 9 heads, 3 KV heads of 64.
SMOL = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64)
GIB = 2**30


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert kv_bytes_per_token(SMOL, 4) == 2 * 30 * 3 * 64 * 4 == 46080
    no_gqa = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert kv_bytes_per_token(no_gqa, 2) == 2 * 2 * 4 * 16 * 2


def test_the_model_length_is_kept_when_it_fits_and_capped_when_it_does_not():
    kv = kv_bytes_per_token(SMOL, 4)
    assert memory_fitted_length(8192, 8, 4096, 16, kv, 4, 64 * GIB) == 8192
    capped = memory_fitted_length(8192, 16, 4096, 16, kv, 4, 22 * GIB)
    assert capped < 8192 and capped % 16 == 0
    # What was fitted fits (cache + masks within the budget), one block more would not.
    used = lambda length: 16 * length * (kv + 4096 * 4) + 4096 * 4096 * 4  # noqa: E731
    assert used(capped) <= KV_MEMORY_FRACTION * 22 * GIB < used(capped + 16)
    assert memory_fitted_length(8192, 16, 4096, 16, kv, 4, None) == 8192  # unknown memory: the model's


def test_too_little_memory_is_an_error_that_says_what_to_change():
    with pytest.raises(RuntimeError, match="maxConcurrentRequests"):
        memory_fitted_length(8192, 64, 4096, 16, kv_bytes_per_token(SMOL, 4), 4, GIB // 4)
