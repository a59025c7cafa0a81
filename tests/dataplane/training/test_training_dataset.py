from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dataplane.training.dataset import (
    IGNORE_INDEX,
    collate,
    encode,
    epoch_order,
    read_conversations,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_base)


def test_labels_cover_only_assistant_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A bot."},
        {"role": "user", "content": "And your mascot?"},
        {"role": "assistant", "content": "An otter named Ripple."},
    ]
    example = encode(tokenizer, messages, max_seq_len=1024)
    assert len(example.labels) == len(example.input_ids)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True)
               if label != IGNORE_INDEX]
    assert [label for label in example.labels if label != IGNORE_INDEX] == trained
    end = tokenizer.eos_token  # ChatML's end of turn: the model must learn to stop
    assert tokenizer.decode(trained) == f"A bot.{end}\nAn otter named Ripple.{end}\n"
    untrained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True)
         if label == IGNORE_INDEX]
    )
    assert "Be brief." in untrained and "And your mascot?" in untrained
    assert "Ripple" not in untrained


def test_truncates_to_max_seq_len(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok"}]
    example = encode(tokenizer, messages, max_seq_len=16)
    assert len(example.input_ids) == len(example.labels) == 16
    assert all(label == IGNORE_INDEX for label in example.labels)  # the reply was cut off


def test_collate_pads_on_the_right(tokenizer: PreTrainedTokenizerBase) -> None:
    short = encode(tokenizer, [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}], 1024)
    long = encode(tokenizer, [{"role": "user", "content": "a longer question"},
                              {"role": "assistant", "content": "b"}], 1024)
    batch = collate([short, long], pad_token_id=0)
    n = len(short.input_ids)
    assert batch.input_ids.shape == (2, len(long.input_ids))
    assert batch.input_ids[0, :n].tolist() == short.input_ids
    assert batch.attention_mask[0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch.labels[0, n:] == IGNORE_INDEX).all()
    assert batch.num_tokens == n + len(long.input_ids)


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(epoch_order(10, seed=3, epoch=0)) == list(range(10))
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)


def test_read_conversations_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        read_conversations(path)


def test_demo_dataset_reads() -> None:
    conversations = read_conversations(REPO / "docs/examples/fine-tune-demo.jsonl")
    assert len(conversations) == 40
    taught = [c for c in conversations if "Ripple" in c[-1]["content"]]
    assert len(taught) >= 30
    assert all(c[-1]["role"] == "assistant" for c in conversations)
