"""The demo's synthetic tasks: deterministic generators, targets computed right, data layout."""

from __future__ import annotations

import pytest

from trainer.demo import tasks as T


@pytest.mark.parametrize(
    ("fn", "x", "y"),
    [
        (T.reverse, "abcd", "dcba"),
        (T.upper, "house", "HOUSE"),
        (T.sort_letters, "dcab", "abcd"),
        (T.sort_letters, "banana", "aaabnn"),
        (T.drop_vowels, "house", "hs"),
        (T.drop_vowels, "aeiou", ""),
        (T.count_chars, "house", "5"),
        (T.dedupe, "hello", "helo"),
        (T.dedupe, "abab", "ab"),
        (T.first_letters, "ab cd ef", "ace"),
        (T.add_numbers, "12+7", "19"),
        (T.add_numbers, "49+49", "98"),
        (T.copy_twice, "abc", "abcabc"),
        (T.rotate_left, "abcd", "bcda"),
        (T.last_letters, "ab cd ef", "bdf"),
        (T.vowels_only, "house", "oue"),
        (T.reverse_upper, "abc", "CBA"),
        (T.subtract_numbers, "19-7", "12"),
        (T.identity, "a b", "a b"),
        (T.sort_desc, "house", "usohe"),
        (T.count_vowels, "house", "3"),
        (T.count_consonants, "house", "2"),
        (T.min_letter, "house", "e"),
        (T.max_letter, "house", "u"),
        (T.sort_unique, "hello", "ehlo"),
        (T.vowels_sorted, "house", "eou"),
        (T.min_max, "house", "eu"),
        (T.second_letter, "house", "h"),
    ],
)
def test_target_functions(fn, x, y):
    assert fn(x) == y


@pytest.mark.parametrize("name", sorted(T.ALL_TASKS))
def test_generators_are_deterministic_and_consistent(name):
    task = T.get_task(name)
    a = T.generate_examples(name, 50, seed=3)
    b = T.generate_examples(name, 50, seed=3)
    c = T.generate_examples(name, 50, seed=4)
    assert a == b
    assert a != c
    for ex in a:
        assert ex["target"] == task.fn(ex["input"])
        assert 0 < len(ex["input"]) <= 20
        assert len(ex["target"]) <= (20 if name in T.GENERIC_TASKS else 12)
        assert "\n" not in ex["input"]
        assert ex["target"] or name in T.EXTRA_TASKS


def test_suite_sizes_and_disjoint_families():
    assert len(T.SOURCE_TASKS) >= 6
    assert len(T.TARGET_TASKS) >= 4
    assert not set(T.SOURCE_TASKS) & set(T.TARGET_TASKS)
    for name in T.ALL_TASKS:
        assert T.NAME_RE.match(name), name


def test_source_inputs_have_distinct_letters():
    for name in T.SOURCE_TASKS:
        for ex in T.generate_examples(name, 100, seed=0):
            assert len(set(ex["input"])) == len(ex["input"])


def test_splits_are_disjoint_by_input():
    splits = T.generate_splits("reverse", 200, 50, 50, seed=0)
    inputs = [set(e["input"] for e in rows) for rows in splits.values()]
    assert [len(rows) for rows in splits.values()] == [200, 50, 50]
    assert (
        not (inputs[0] & inputs[1]) and not (inputs[0] & inputs[2]) and not (inputs[1] & inputs[2])
    )


def test_write_task_data_layout(tmp_path):
    sizes = T.write_task_data(tmp_path, ["upper", "copy-twice"], 10, 3, 4, seed=1)
    assert sizes == {
        "upper": {"train": 10, "validation": 3, "test": 4},
        "copy-twice": {"train": 10, "validation": 3, "test": 4},
    }
    rows = T.read_jsonl(tmp_path / "upper" / "test.jsonl")
    assert len(rows) == 4
    assert all(r["target"] == r["input"].upper() for r in rows)
    again = tmp_path / "again"
    T.write_task_data(again, ["upper"], 10, 3, 4, seed=1)
    assert (again / "upper" / "train.jsonl").read_text() == (
        tmp_path / "upper" / "train.jsonl"
    ).read_text()


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown demo task"):
        T.get_task("nope")
