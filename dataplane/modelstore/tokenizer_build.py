"""A working ChatML tokenizer trained offline on the bundled corpus.

Byte-level BPE: every byte has a token, so any text round-trips even though the corpus is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .corpus import CORPUS

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so their ids are 0, 1, 2 as in SmolLM2.
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

# ChatML, the format SmolLM2 uses, without SmolLM2's default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(slots=True, frozen=True)
class TokenIds:
    """The special ids config.json and generation_config.json must agree on."""

    bos: int
    eos: int
    pad: int
    vocab_size: int  # tokens the tokenizer can emit; at most the model's vocab_size


def train_tokenizer(max_vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One line at a time, in order: the trainer's result then depends only on the text.
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def write_tokenizer(dest: Path, *, max_vocab_size: int, model_max_length: int) -> TokenIds:
    """Train, wrap as a transformers fast tokenizer and save into dest."""
    # transformers is imported here: it is slow to import and only this path needs it.
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_tokenizer(max_vocab_size)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        # Otherwise decode() rewrites " ." to "." and text stops round-tripping.
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(dest)
    ids = TokenIds(
        bos=_token_id(tokenizer, END_OF_TEXT),
        eos=_token_id(tokenizer, IM_END),
        pad=_token_id(tokenizer, END_OF_TEXT),
        vocab_size=tokenizer.get_vocab_size(),
    )
    assert ids.vocab_size <= max_vocab_size, "BPE trainer exceeded its vocab_size"
    return ids


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, f"{token} was not trained"  # special tokens always are
    return token_id
