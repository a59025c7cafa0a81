from __future__ import annotations

from dataclasses import dataclass, field

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
