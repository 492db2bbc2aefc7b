"""Shared by the kron tests: the tiny GPT-2 with calibration statistics that the profile and evolution tests use, and
one torch thread for the tests that ask for it."""
from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): small matrices, faster without thread hand-offs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_calibrated_gpt2():
    """make(held_rows, held_batches) -> (model, stats, held): a 2-layer GPT-2 (d=32, vocab 64, seed 0), the input
    statistics of its linear layers on 2 batches of 4 x 16 random tokens, and `held_batches` held-out batches of
    `held_rows` x 16 tokens (the same generator, drawn after the fit batches)."""

    def make(held_rows: int, held_batches: int):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from kron.calibration import collect_input_stats

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)).eval()
        g = torch.Generator().manual_seed(1)
        fit = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]
        held = [torch.randint(0, 64, (held_rows, 16), generator=g) for _ in range(held_batches)]
        return model, collect_input_stats(model, fit), held

    return make
