"""Data mixtures, random max_samples and replay (issue 20): which rows training gets."""

import json
from collections import Counter

import pytest

from tunelab.config import DatasetSource, load_config
from tunelab.data.mixture import mix, mixture_counts
from tunelab.errors import TunelabError
from tunelab.train.dataset import read_training_data


def write_chats(path, tag: str, n: int):
    rows = [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tags(convs) -> Counter:
    return Counter(c.messages[0].content.split()[0] for c in convs)


def cfg(**values):
    return load_config(None, {"output_dir": "runs/x", **values})


@pytest.fixture
def files(tmp_path):
    return write_chats(tmp_path / "a.jsonl", "a", 100), write_chats(tmp_path / "b.jsonl", "b", 30)


def test_weights_interleave_without_repeats_and_samples_are_exact_counts(files):
    a, b = files
    data = read_training_data(cfg(dataset=[{"path": a, "weight": 0.5}, {"path": b, "weight": 0.5}]))
    # interleave_under: the short source (30 rows) decides the size, nothing repeats.
    assert tags(data.train) == {"a": 30, "b": 30}
    assert len({c.messages[0].content for c in data.train}) == 60
    assert [s["taken"] for s in data.mixture["sources"]] == [30, 30]
    assert data.mixture["mix_strategy"] == "interleave_under"

    counted = read_training_data(cfg(dataset=[{"path": a, "samples": 10}, b]))
    assert tags(counted.train) == {"a": 10, "b": 30}  # a plain entry keeps every row


def test_a_count_above_the_rows_repeats_and_says_so(files, capsys):
    a, b = files
    data = read_training_data(cfg(dataset=[a, {"path": b, "samples": 75}]))
    assert tags(data.train) == {"a": 100, "b": 75}
    seen = Counter(c.messages[0].content for c in data.train if c.messages[0].content.startswith("b"))
    assert set(seen.values()) == {2, 3} and len(seen) == 30  # two full passes + 15 drawn again
    assert data.mixture["sources"][1]["repeated"] == 45
    assert "45 drawn again with replacement" in capsys.readouterr().err


def test_mixture_is_the_same_under_the_seed_and_changes_with_it(files):
    a, b = files
    entries = [{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3}]
    first = [c.source for c in read_training_data(cfg(dataset=entries)).train]
    assert first == [c.source for c in read_training_data(cfg(dataset=entries)).train]
    assert first != [c.source for c in read_training_data(cfg(dataset=entries, seed=7)).train]


def test_llama_factory_interleave_probs_and_mix_strategy_map_to_weights(files):
    a, b = files
    under = read_training_data(cfg(dataset=[a, b], interleave_probs=[0.5, 0.5], mix_strategy="interleave_under"))
    over = read_training_data(cfg(dataset=[a, b], interleave_probs=[0.5, 0.5], mix_strategy="interleave_over"))
    assert tags(under.train) == {"a": 30, "b": 30}
    assert tags(over.train) == {"a": 100, "b": 100}  # every row used; the short source repeats
    assert mixture_counts([100, 30], [DatasetSource("a"), DatasetSource("b")], "concat") == [100, 30]


def test_max_samples_draws_at_random_and_head_keeps_the_old_first_rows(files):
    a, b = files
    head = read_training_data(cfg(dataset=[a, b], max_samples=20, max_samples_strategy="head"))
    assert [c.messages[0].content for c in head.train] == [f"a question {i}" for i in range(20)]
    drawn = read_training_data(cfg(dataset=[a, b], max_samples=20))
    assert len(drawn.train) == 20 and "b" in tags(drawn.train)  # from the whole union, not the head


def test_validation_is_split_before_mixing_so_no_held_out_row_is_trained(files):
    a, b = files
    data = read_training_data(cfg(dataset=[a, {"path": b, "samples": 90}], val_size=0.2, val_split_by="record"))
    held = {c.messages[0].content for c in data.eval}
    assert held and held.isdisjoint(c.messages[0].content for c in data.train)


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "wieght": 1}, "did you mean 'weight'"),
    ({"path": "a.jsonl", "weight": 0.5, "samples": 3}, "both weight and samples"),
    ({"path": "a.jsonl", "weight": -1}, "weight must be a number > 0"),
    ({"weight": 1}, "has no path"),
])
def test_bad_entries_name_the_file_and_the_entry(tmp_path, entry, message):
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps({"dataset": ["b.jsonl", entry]}))
    with pytest.raises(TunelabError) as err:
        load_config(path)
    assert err.value.where == str(path) and "dataset[1]" in err.value.what and message in err.value.message()


def test_weights_with_concat_or_a_missing_weight_are_refused(files):
    a, b = files
    with pytest.raises(TunelabError, match="concat takes every row"):
        cfg(dataset=[{"path": a, "weight": 1}, {"path": b, "weight": 1}], mix_strategy="concat")
    with pytest.raises(TunelabError, match="has no weight while others do"):
        cfg(dataset=[{"path": a, "weight": 1}, b])
    with pytest.raises(TunelabError, match="one probability per dataset entry"):
        cfg(dataset=[a, b], interleave_probs=[1.0])


def test_replay_mixes_a_share_of_an_earlier_runs_training_rows(files, tmp_path):
    from tunelab.config import save_config

    a, b = files
    earlier = cfg(dataset=[a], val_size=0.1, val_split_by="record", output_dir=str(tmp_path / "stage1"))
    (tmp_path / "stage1").mkdir()
    save_config(earlier, tmp_path / "stage1" / "config.yaml")
    stage1 = read_training_data(earlier)
    data = read_training_data(cfg(dataset=[b], replay={"data": str(tmp_path / "stage1"), "fraction": 0.2}))
    replayed = [c for c in data.train if c.messages[0].content.startswith("a")]
    assert len(replayed) == 18  # a fifth of the 90 rows stage 1 trained on
    assert {c.messages[0].content for c in replayed} <= {c.messages[0].content for c in stage1.train}
    assert data.mixture["replay"]["taken"] == 18 and data.mixture["training_rows"] == 48
    held = read_training_data(cfg(dataset=[b], replay={"data": str(tmp_path / "stage1"), "samples": 5,
                                                        "split": "validation"}))
    assert {c.messages[0].content for c in held.train if c.messages[0].content.startswith("a")} <= \
        {c.messages[0].content for c in stage1.eval}
    with pytest.raises(TunelabError, match="exactly one of fraction and samples"):
        cfg(dataset=[b], replay={"data": a})
    with pytest.raises(TunelabError, match="not a tunelab run"):
        read_training_data(cfg(dataset=[b], replay={"data": str(tmp_path), "fraction": 0.5}))


def test_mix_keeps_plain_lists_in_file_order():
    rows, takes = mix([[1, 2, 3], [4, 5]], [DatasetSource("a"), DatasetSource("b")], "concat", seed=0)
    assert rows == [1, 2, 3, 4, 5] and [t.taken for t in takes] == [3, 2]


def test_max_samples_strategy_without_max_samples_is_refused():
    """No key accepted and ignored: `head` only means something with max_samples."""
    from tunelab.config import load_config
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="max_samples_strategy=head has no effect without max_samples"):
        load_config(overrides={"max_samples_strategy": "head"})
    assert load_config(overrides={"max_samples_strategy": "head", "max_samples": 5}).max_samples == 5
