from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch

from controlplane.wire import SamplingSpec
from dataplane.flowserve.sampler import (
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
    sample,
)
from dataplane.flowserve.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator = field(default_factory=torch.Generator)
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


def seeded(params: SamplingParams, seed: int) -> Row:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return Row(params, generator)


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 4.9]])
    result = sample(logits, [Row(SamplingParams(temperature=0.0))] * 2)
    assert result.token_ids == [1, 0]
    assert result.logprobs == [None, None]


def test_top_k_and_top_p_masks() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.5]))
    assert out[0].tolist() == [NEG_INF, 4.0, 3.0, NEG_INF]
    # softmax([4,3,2,1]) = .64, .24, ...: 0.64 alone reaches 0.5
    assert out[1].tolist() == [NEG_INF, 4.0, NEG_INF, NEG_INF]


def test_min_p_mask() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.2]))  # keeps p >= 0.1
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    row = Row(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt_token_ids=[0],
        output_token_ids=[1, 2, 2],
    )
    out = apply_penalties(logits, [row])
    # 0: prompt only -> repetition (2/2); 1: output once -> -2*2 - .25 - .5;
    # 2: output twice -> 1/2 - .5 - .5; 3: unseen
    assert out[0].tolist() == pytest.approx([1.0, -4.75, -0.5, 1.0])


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=3)
    alone = [sample(logits[1:2], [seeded(params, 3)]).token_ids[0] for _ in range(5)]
    row = seeded(params, 3)
    draws = []
    for _ in range(5):
        noisy = [Row(SamplingParams(temperature=0.8)), row, Row(SamplingParams(temperature=0.0))]
        draws.append(sample(logits, noisy).token_ids[1])
    assert alone == [alone[0]] * 5  # a fresh generator with the same seed repeats its first draw
    assert draws[0] == alone[0]
    # and one generator carried across steps keeps drawing fresh values
    assert len(set(draws)) > 1


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    row = seeded(SamplingParams(temperature=1.0), 0)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[sample(logits, [row]).token_ids[0]] += 1
    assert counts[0] / 2000 == pytest.approx(0.7, abs=0.05)
    assert counts[2] / 2000 == pytest.approx(0.1, abs=0.03)


def reference_probs(logits: list[float], params: SamplingParams) -> list[float]:
    """What sampling should draw from, written out by hand in vLLM's order: softmax(logits / T);
    min_p on those probabilities; the top_k best of what is left; then the smallest set of
    those, best first, whose mass (renormalised over them) reaches top_p."""
    scaled = [x / params.temperature for x in logits]
    weights = [math.exp(x - max(scaled)) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    best_first = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = [i for i in best_first if probs[i] >= params.min_p * max(probs)][: params.top_k]
    total, mass, final = sum(probs[i] for i in kept), 0.0, []
    for i in kept:
        if mass >= params.top_p * total:
            break
        final.append(i)
        mass += probs[i]
    return [probs[i] / mass if i in final else 0.0 for i in range(len(probs))]


SIX = [math.log(p) for p in (0.4, 0.25, 0.15, 0.1, 0.06, 0.04)]
EIGHT = [math.log(p) for p in (0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02)]
NUM_DRAWS = 4000
FREQUENCY_ATOL = 0.03  # about 4 standard deviations of a frequency over NUM_DRAWS draws


@pytest.mark.parametrize(
    ("logits", "params"),
    [
        pytest.param(SIX, SamplingParams(temperature=0.5), id="T=0.5"),
        pytest.param(SIX, SamplingParams(temperature=2.0), id="T=2"),
        pytest.param(SIX, SamplingParams(temperature=0.5, top_k=3), id="T=0.5,top_k"),
        pytest.param(SIX, SamplingParams(temperature=2.0, top_p=0.6), id="T=2,top_p"),
        pytest.param(SIX, SamplingParams(temperature=0.5, min_p=0.1), id="T=0.5,min_p"),
        # min_p drops token 7, top_k tokens 5 and 6, and top_p (over the five left) token 4
        pytest.param(
            EIGHT,
            SamplingParams(temperature=2.0, top_k=5, top_p=0.7, min_p=0.3),
            id="T=2,top_k,top_p,min_p",
        ),
    ],
)
def test_sampling_follows_the_tempered_filtered_distribution(
    logits: list[float], params: SamplingParams
) -> None:
    expected = reference_probs(logits, params)
    # With the temperature ignored, the frequencies would sit this far from `expected`.
    untempered = reference_probs(logits, replace(params, temperature=1.0))
    assert max(abs(a - b) for a, b in zip(expected, untempered, strict=True)) > 2 * FREQUENCY_ATOL
    row = seeded(params, 0)
    batch = torch.tensor([logits])
    counts = [0] * len(logits)
    for _ in range(NUM_DRAWS):
        counts[sample(batch, [row]).token_ids[0]] += 1
    assert [c / NUM_DRAWS for c in counts] == pytest.approx(expected, abs=FREQUENCY_ATOL)
    assert all(c == 0 for c, p in zip(counts, expected, strict=True) if p == 0.0)  # filtered out


def test_logprobs_ignore_sampling_transforms() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0.3, top_k=1, logprobs=True, top_logprobs=2)
    result = sample(logits, [seeded(params, 1)])
    assert result.token_ids == [2]
    [lp] = result.logprobs
    assert lp is not None
    expected = logits[0].log_softmax(-1)
    assert lp.logprob == pytest.approx(expected[2].item())
    assert [t for t, _ in lp.top] == [2, 1]
    assert lp.top[1][1] == pytest.approx(expected[1].item())
    assert compute_logprobs(logits, [0], [Row(SamplingParams(logprobs=True))])[0].top == ()  # type: ignore[union-attr]


def test_params_from_spec() -> None:
    spec = SamplingSpec(seed=2**63 - 1, top_k=-1, n=2, top_logprobs=3, stop=["x"])
    first, second = (SamplingParams.from_spec(spec, i) for i in range(2))
    assert first.top_k is None and first.logprobs and first.stop == ("x",)
    assert second.seed == 2**63  # seed + index, kept in the generator's 64-bit range
    assert SamplingParams.from_spec(SamplingSpec(seed=-1)).seed == 2**64 - 1
    assert SamplingParams(temperature=0.0).greedy


def test_chunked_argmax_takes_the_first_maximum() -> None:
    from dataplane.flowserve.sampler import chunked_argmax, greedy_argmax

    logits = torch.randn(5, 96).to(torch.bfloat16)
    logits[1, 40] = logits[1, 70] = 100.0  # a tie across chunks: the first wins
    logits[2, 33] = logits[2, 35] = 100.0  # a tie inside a chunk
    logits[3] = 0.0  # every entry ties
    expected = logits.float().argmax(dim=-1)
    assert torch.equal(chunked_argmax(logits, 32), expected)
    assert torch.equal(chunked_argmax(logits, 8), expected)
    assert torch.equal(greedy_argmax(logits), expected)
