"""The decode step's token choice in one kernel (vrft.kernels.decode_sampling) against TokenChooser's torch ops.

Greedy choices and every recorded log-prob are compared with the torch path's; draws are checked for what
must hold of each (never a suppressed id, no EOS before `min_new_tokens`, the pad after a stop, the
log-prob of the drawn token) and, over many rows of one set of logits, for their frequencies. The seed is
fixed, so each check sees the same draws every run.
"""

import importlib.util

import pytest
import torch

from tests.kernels.interpreter import interpreted

ROWS, VOCAB = 5, 2500
SUPPRESSED, EOS, PAD = [4, 10, 2400], [7, 9], 0


def case(device, rows=ROWS, vocab=VOCAB):
    """Logits whose greedy choice would be a suppressed id in row 0 and an EOS id in row 1; row 4 is done."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[0, SUPPRESSED[2]] = 50.0
    logits[1, EOS[1]] = 50.0
    suppress = torch.zeros(vocab)
    suppress[SUPPRESSED] = float("-inf")
    done = torch.zeros(rows, dtype=torch.bool)
    done[-1] = True
    return [t.to(device) for t in (logits, suppress, torch.tensor(EOS), done)]


def run_steps(device, sample: bool, steps: int = 3, slices=None, min_new: int = 2, temperature: float = 0.7):
    """`steps` calls of the kernel on the same logits: what each wrote, and the logits."""
    from vrft.kernels import decode_sampling

    logits, suppress, eos, done = case(device)
    tokens = torch.zeros(ROWS, dtype=torch.long, device=device)
    completion = torch.full((ROWS, steps), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros(ROWS, steps, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    seed = torch.tensor([20261206], device=device)
    min_new_tokens = torch.tensor(min_new, device=device)
    for _ in range(steps):
        decode_sampling.choose(
            logits, suppress, eos, seed, step, min_new_tokens, done, tokens, completion, logprobs, temperature,
            PAD, sample, slices,
        )  # fmt: skip
    return logits, completion, logprobs, done, step, tokens


def torch_path(logits, steps: int, sample: bool, temperature: float = 0.7, min_new: int = 2):
    """`TokenChooser`'s torch ops (the reference) run for `steps` steps on `case`'s inputs: the chooser."""
    from types import SimpleNamespace

    from vrft.rollout.base import Sampling
    from vrft.rollout.static import TokenChooser

    done = case("cpu")[3]
    sampling = Sampling(sample, temperature, 1.0, steps, min_new, tuple(SUPPRESSED))
    chooser = TokenChooser(SimpleNamespace(tokens=torch.zeros(ROWS, dtype=torch.long)), sampling, EOS, PAD)
    chooser.done.copy_(done)
    for _ in range(steps):
        chooser.choose(logits)
    return chooser


def check_steps(logits, completion, logprobs, done, step, tokens, sample: bool, temperature: float = 0.7):
    """The kernel's writes against the torch path's: greedy, the same tokens, stops and log-probs; drawn, what
    must hold of every draw (the torch path draws other tokens from its own generator)."""
    steps = completion.shape[1]
    assert int(step) == steps
    assert torch.equal(tokens, completion[:, -1])
    if not sample:
        reference = torch_path(logits, steps, sample, temperature)
        assert torch.equal(completion, reference.completion)
        assert torch.equal(done, reference.done)
        torch.testing.assert_close(logprobs, reference.logprobs, atol=1e-5, rtol=0)
        return
    record = torch.log_softmax(logits / temperature, dim=-1)
    stopped = torch.zeros(ROWS, dtype=torch.bool)
    stopped[-1] = True
    for index in range(steps):
        token = completion[:, index]
        assert not bool(torch.isin(token, torch.tensor(SUPPRESSED)).any())
        if index < 2:  # min_new_tokens: no EOS yet
            assert not bool(torch.isin(token[~stopped], torch.tensor(EOS)).any())
        assert bool((token[stopped] == PAD).all())
        # the recorded log-prob is the unsuppressed log-softmax's at the token (the pad's once stopped)
        torch.testing.assert_close(
            logprobs[:, index], record.gather(1, token[:, None])[:, 0], atol=1e-5, rtol=0
        )
        stopped |= torch.isin(token, torch.tensor(EOS))
    assert torch.equal(done, stopped)


INTERPRETED = """
import sys, torch
from tests.kernels.test_decode_sampling import run_steps
results = []
for sample in (False, True):
    for slices in (None, 1, 3):
        results.append((sample, run_steps("cpu", sample, slices=slices)))
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_token_choice_under_the_triton_interpreter(tmp_path):
    results = interpreted(INTERPRETED, tmp_path / "sampling.pt")
    for sample, outputs in results:
        check_steps(*outputs, sample=sample)
    # greedy in row 1 at step 2 takes the EOS it was kept from (its logit is 50), then the row is done
    greedy = results[0][1][1]
    assert greedy[1].tolist()[2] == EOS[1]


def frequencies(device, rows: int, vocab: int = 4096, slices: int = 4):
    """The kernel's draws from one set of logits, repeated over `rows` rows: six live tokens in different
    slices of the vocabulary (the rest ~e^-40 less likely), counted; and their softmax at temperature 0.7."""
    from vrft.kernels import decode_sampling

    live = torch.tensor([5, 1030, 1031, 2050, 3070, 4095])
    logits = torch.full((vocab,), -40.0)
    logits[live] = torch.tensor([0.0, 1.0, -0.5, 0.3, 2.0, -1.0])
    batch = logits.repeat(rows, 1).to(device)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    completion = torch.zeros(rows, 1, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, 1, device=device)
    decode_sampling.choose(
        batch, torch.zeros(vocab, device=device), torch.tensor([vocab + 1], device=device),
        torch.tensor([7], device=device), torch.zeros(1, dtype=torch.long, device=device),
        torch.tensor(0, device=device), torch.zeros(rows, dtype=torch.bool, device=device), tokens, completion,
        logprobs, 0.7, 0, True, slices,
    )  # fmt: skip
    counts = torch.bincount(tokens.cpu(), minlength=vocab)
    expected = (logits / 0.7).softmax(-1) * rows
    return counts[live].double(), expected[live].double(), int(counts.sum() - counts[live].sum())


def assert_frequencies(observed, expected, others):
    """Pearson's chi-square over the six live tokens (5 degrees of freedom): 30 has probability ~1.5e-5
    under the softmax, while a draw from the wrong distribution (another temperature, one slice's tokens
    favoured) gives hundreds at these counts. The seed is fixed, so the statistic is the same each run."""
    assert others == 0
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 30, (observed.tolist(), expected.tolist())


FREQUENCIES = """
import sys, torch
from tests.kernels.test_decode_sampling import frequencies
torch.save(frequencies("cpu", 2048), sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_draws_follow_the_softmax_under_the_triton_interpreter(tmp_path):
    assert_frequencies(*interpreted(FREQUENCIES, tmp_path / "frequencies.pt"))


@pytest.mark.gpu
@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("slices", [None, 1, 3])
def test_token_choice_on_cuda(sample, slices):
    outputs = run_steps("cuda", sample, slices=slices)
    check_steps(*(t.cpu() for t in outputs), sample=sample)


@pytest.mark.gpu
def test_draws_follow_the_softmax_on_cuda():
    assert_frequencies(*frequencies("cuda", 16384))


@pytest.mark.gpu
def test_graph_replays_draw_what_eager_steps_draw():
    # The seed and the step counter live on the device: a captured step replayed draws what the same steps
    # run eagerly draw, and the counters are back at zero after each replay.
    from vrft.kernels import decode_sampling

    def chooser():
        logits, suppress, eos, done = case("cuda")
        buffers = dict(
            tokens=torch.zeros(ROWS, dtype=torch.long, device="cuda"),
            completion=torch.zeros(ROWS, 4, dtype=torch.long, device="cuda"),
            logprobs=torch.zeros(ROWS, 4, device="cuda"),
            step=torch.zeros(1, dtype=torch.long, device="cuda"),
            done=done,
        )

        def step():
            decode_sampling.choose(
                logits, suppress, eos, torch_seed, buffers["step"], min_new, buffers["done"], buffers["tokens"],
                buffers["completion"], buffers["logprobs"], 0.7, PAD, True,
            )  # fmt: skip

        return step, buffers

    torch_seed = torch.tensor([99], device="cuda")
    min_new = torch.tensor(1, device="cuda")
    eager, eager_buffers = chooser()
    for _ in range(4):
        eager()
    replayed, replayed_buffers = chooser()
    replayed()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed()
    for _ in range(3):
        graph.replay()
    for name, value in eager_buffers.items():
        torch.testing.assert_close(replayed_buffers[name], value, rtol=0, atol=0)


def test_only_a_sampling_chooser_takes_a_seed_from_torch():
    # The fused kernel's seed comes from torch's generator once per rollout; greedy decoding draws nothing,
    # so it leaves the generator where it was (what the training draws next does not depend on the engine).
    from types import SimpleNamespace

    from vrft.rollout.base import Sampling
    from vrft.rollout.static import TokenChooser

    state = SimpleNamespace(tokens=torch.zeros(2, dtype=torch.long))
    for sample in (False, True):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        TokenChooser(state, Sampling(do_sample=sample, max_new_tokens=2), EOS, PAD, fused=True)
        assert torch.equal(torch.get_rng_state(), before) is not sample
