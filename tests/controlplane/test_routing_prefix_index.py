from __future__ import annotations

import pytest

from controlplane.routing.prefix_index import PrefixIndex, chunk_keys

SYSTEM = "You are a helpful assistant. " * 8  # 232 chars


def test_chunk_keys_are_chained_and_full_only() -> None:
    assert chunk_keys("abc", 4) == []
    a = chunk_keys("aaaabbbbcc", 4)
    assert len(a) == 2
    assert chunk_keys("xxxxbbbb", 4)[1] != a[1]  # same chunk text, different prefix
    assert chunk_keys("aaaabbbbzz", 4) == a


def test_empty_index_and_short_text_match_nothing() -> None:
    idx = PrefixIndex(chunk_chars=4)
    assert idx.match("anything") == {}
    idx.insert("i1", "abcdefgh")
    assert idx.match("") == {}
    assert idx.match("abc") == {}  # shorter than a chunk


def test_match_is_longest_common_prefix_at_chunk_granularity() -> None:
    idx = PrefixIndex(chunk_chars=4)
    idx.insert("i1", "aaaabbbbccccdddd")
    idx.insert("i2", "aaaabbbbxxxx")
    idx.insert("i3", "zzzz")
    assert idx.match("aaaabbbbccccdddd") == {"i1": 16, "i2": 8}
    assert idx.match("aaaabbbbcccc-and-more") == {"i1": 12, "i2": 8}
    assert idx.match("aaaabbbbccXX") == {"i1": 8, "i2": 8}  # partial chunk does not count
    assert idx.match("aaaabbbbccccdddd" + "eeee") == {"i1": 16, "i2": 8}
    assert idx.match("zzzzaaaa") == {"i3": 4}
    assert idx.match("qqqq") == {}


def test_text_inserted_twice_and_prefixes_of_each_other() -> None:
    idx = PrefixIndex(chunk_chars=4)
    idx.insert("i1", "aaaabbbb")
    idx.insert("i1", "aaaabbbbcccc")
    idx.insert("i1", "aaaabbbb")
    assert idx.chars("i1") == 12
    assert idx.match("aaaabbbbcccc") == {"i1": 12}


def test_remove_instance() -> None:
    idx = PrefixIndex(chunk_chars=4)
    idx.insert("i1", "aaaabbbb")
    idx.insert("i2", "aaaabbbb")
    idx.remove_instance("i1")
    idx.remove_instance("unknown")
    assert idx.match("aaaabbbb") == {"i2": 8}
    assert idx.instances() == ["i2"]
    assert idx.chars("i1") == 0
    idx.remove_instance("i2")
    assert idx.match("aaaabbbb") == {}
    assert idx._holders == {}  # no key outlives its last holder


def test_cap_bounds_memory_and_evicts_oldest_prompts() -> None:
    idx = PrefixIndex(chunk_chars=4, max_chars_per_instance=16)
    idx.insert("i1", "AAAAaaaa")
    idx.insert("i1", "BBBBbbbb")
    idx.insert("i1", "CCCCcccc")  # 24 chars > 16: the oldest prompt goes first
    assert idx.chars("i1") == 16
    assert idx.match("AAAAaaaa") == {}
    assert idx.match("BBBBbbbb") == {"i1": 8}
    assert idx.match("CCCCcccc") == {"i1": 8}


def test_eviction_keeps_shared_prefix_over_tails() -> None:
    idx = PrefixIndex(chunk_chars=4, max_chars_per_instance=16)
    idx.insert("i1", SYSTEM[:4] + "tail1111")
    idx.insert("i1", SYSTEM[:4] + "TAIL2222")  # 5 chunks held, cap 4: one old tail chunk goes
    assert idx.chars("i1") == 16
    assert idx.match(SYSTEM[:4] + "TAIL2222") == {"i1": 12}
    assert idx.match(SYSTEM[:4] + "tail1111") == {"i1": 8}  # its last chunk was evicted
    assert idx.match(SYSTEM[:4] + "other") == {"i1": 4}


def test_eviction_is_per_instance_and_matching_does_not_refresh() -> None:
    idx = PrefixIndex(chunk_chars=4, max_chars_per_instance=8)
    idx.insert("i1", "AAAAaaaa")
    idx.insert("i2", "AAAAaaaa")
    idx.match("AAAAaaaa")
    idx.insert("i1", "BBBBbbbb")
    assert idx.match("AAAAaaaa") == {"i2": 8}
    assert idx.match("BBBBbbbb") == {"i1": 8}


def test_cap_under_long_traffic_stays_bounded() -> None:
    idx = PrefixIndex(chunk_chars=16, max_chars_per_instance=1024)
    for n in range(500):
        idx.insert(f"i{n % 3}", SYSTEM + f"question number {n} " * 5)
    for i in ("i0", "i1", "i2"):
        assert idx.chars(i) <= 1024
    assert sum(len(s) for s in idx._holders.values()) == sum(
        idx.chars(i) // 16 for i in idx.instances()
    )
    full = len(SYSTEM) // 16 * 16
    assert idx.match(SYSTEM + "new question") == {"i0": full, "i1": full, "i2": full}


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(chunk_chars=0)
    with pytest.raises(ValueError):
        PrefixIndex(chunk_chars=64, max_chars_per_instance=63)


def test_unicode_text() -> None:
    idx = PrefixIndex(chunk_chars=2)
    idx.insert("i1", "日本語のテキスト")
    assert idx.match("日本語のテスト") == {"i1": 4}
    idx.insert("i1", "\ud800bad surrogate")  # lone surrogates must not crash hashing
