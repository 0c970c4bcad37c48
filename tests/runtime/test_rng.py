"""Rollout random state keyed by the rows: the same draws whichever rank, and the run's RNG untouched."""

import torch

from vrft.runtime.rng import prompt_seed, seeded_rng


def test_prompt_seed_depends_on_the_rows_and_epoch_only():
    assert prompt_seed(0, 0, [3]) == prompt_seed(0, 0, [3])  # another process computes the same (int hash)
    assert (
        len({prompt_seed(0, 0, [3]), prompt_seed(0, 1, [3]), prompt_seed(0, 0, [4]), prompt_seed(1, 0, [3])})
        == 4
    )


def test_seeded_rng_draws_from_its_seed_and_restores_the_global_state():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with seeded_rng(3, torch.device("cpu")):
        first = torch.rand(4)
    torch.rand(7)  # the global stream moves on; the seeded draw does not follow it
    with seeded_rng(3):
        again = torch.rand(4)
    assert torch.equal(first, again)
    torch.manual_seed(5)
    torch.rand(7)
    expected = torch.get_rng_state()
    torch.set_rng_state(state)
    with seeded_rng(3):
        torch.rand(4)
    torch.rand(7)
    assert torch.equal(torch.get_rng_state(), expected)  # as if the seeded rollout never drew
