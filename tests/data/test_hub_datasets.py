"""`dataset: org/name` and save_to_disk folders through HF datasets, offline; the local cache first."""

import json
import os
import subprocess
import sys

import pytest

from conftest import hub_dataset_repo
from tunelab.config import load_config
from tunelab.data.readers import HubOptions, hub_options, load_conversations
from tunelab.errors import TunelabError

datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'tunelab[hub]')")

CHATS = [{"messages": [{"role": "user", "content": f"question {i}"},
                       {"role": "assistant", "content": f"answer {i}"}]} for i in range(6)]


@pytest.fixture
def hub_cache(offline_hub):
    """An HF hub cache holding the dataset repo acme/chats (train and test files), as `hf download` leaves it."""
    hub_dataset_repo(offline_hub, "acme/chats", {"train.jsonl": CHATS[:4], "test.jsonl": CHATS[4:]})
    return offline_hub


def test_hub_id_reads_from_the_local_cache_offline(hub_cache):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: nothing may download
    train = load_conversations("acme/chats")
    test = load_conversations(["acme/chats"], hub=HubOptions(split="test"))
    assert [c.messages[0].content for c in train] == [f"question {i}" for i in range(4)]
    assert [c.messages[1].content for c in test] == ["answer 4", "answer 5"]


def test_streaming_stops_at_max_samples(hub_cache):
    loaded = load_conversations("acme/chats", hub=HubOptions(streaming=True), max_samples=2)
    assert [c.messages[0].content for c in loaded] == ["question 0", "question 1"]


def test_unknown_split_names_the_key(hub_cache):
    with pytest.raises(TunelabError) as err:
        load_conversations("acme/chats", hub=HubOptions(split="validation"))
    assert "dataset_split" in err.value.fix and "acme/chats" in err.value.where


def test_missing_while_offline_says_hf_download(hub_cache):
    with pytest.raises(TunelabError) as err:
        load_conversations("acme/other")
    assert "hf download acme/other --repo-type dataset" in err.value.fix
    assert "huggingface-cli" not in err.value.fix


def test_missing_while_online_goes_to_the_hub(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list(CHATS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_conversations("acme/other", hub=HubOptions("train", "en", True))) == 1
    assert calls == [("acme/other", "en", "train", True)]


def test_save_to_disk_folder_with_record_locations(tmp_path):
    rows = CHATS[:2] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    with pytest.raises(TunelabError) as err:
        load_conversations(str(tmp_path / "saved"))
    assert err.value.where == f"{tmp_path / 'saved'}:record 3"
    assert len(load_conversations(str(tmp_path / "saved"), skip_invalid=True)) == 2


def test_hub_keys_with_only_local_files_are_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n")
    cfg = load_config(None, {"dataset": [str(data)], "dataset_split": "test"})
    with pytest.raises(TunelabError, match="dataset_split"):
        hub_options(cfg)


def test_import_tunelab_changes_no_environment_variable():
    code = ("import os; before = dict(os.environ); import tunelab, tunelab.model.loader, tunelab.data.readers; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
