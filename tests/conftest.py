"""Shared test fixtures: real tokenizers from ../shared, tiny random models built on them.

Loading a GGUF vocabulary takes ~40 s, so each one is converted once and cached as a
plain HF tokenizer folder under $TUNELAB_CACHE (default ~/.cache/tunelab).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# Tests never download: hub lookups stay in the local cache (tunelab itself leaves this to the user).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNELAB_SHARED", REPO.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"
TEMPLATES = TOKENIZERS / "templates"
HOTEL = SHARED / "data" / "hotel"
CACHE = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))

GGUF_VOCABS = {
    "qwen2": "ggml-vocab-qwen2.gguf",
    "llama3": "ggml-vocab-llama-bpe.gguf",
    "deepseek": "ggml-vocab-deepseek-llm.gguf",
    "phi3": "ggml-vocab-phi-3.gguf",
    "baichuan": "ggml-vocab-baichuan.gguf",
}


def shared_tokenizer(name: str):
    """A real tokenizer from ../shared/tokenizers, cached as an HF folder after the first load."""
    from transformers import AutoTokenizer

    cached = CACHE / "test-tokenizers" / name
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(TOKENIZERS, gguf_file=GGUF_VOCABS[name])
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    tmp.replace(cached) if not cached.exists() else None
    return AutoTokenizer.from_pretrained(cached)


def template_text(filename: str) -> str:
    return (TEMPLATES / filename).read_text(encoding="utf-8")


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A random-weight Llama (SmolLM2's architecture) small enough for CPU unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    return shared_tokenizer("qwen2")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return shared_tokenizer("llama3")


@pytest.fixture(scope="session")
def hotel_dir() -> Path:
    assert HOTEL.is_dir(), f"the hotel data set is expected at {HOTEL}"
    return HOTEL


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with the real Qwen2 tokenizer (ChatML template): loads like any HF folder.

    A tokenizer of its own, not the session's `qwen2_tokenizer`: training locks its template into
    the tokenizer it is given (data.templates.lock_template), and a test that trained with another
    template before this fixture ran must not change what this folder holds."""
    tokenizer = shared_tokenizer("qwen2")
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_lora_adapter(base_dir: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A saved PEFT adapter for the model in `base_dir` whose B (and DoRA magnitude) are random,
    so it changes the model's output (a fresh LoRA has B = 0 and changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.name_or_path = str(base_dir)
    # Short module names, as `tunelab train` writes them.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU the threads' spinning makes
    each step several times slower (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hub_dataset_repo(hub: Path, repo_id: str, files: dict[str, list[dict]]) -> Path:
    """A dataset repo in the HF hub cache folder `hub`, as `hf download` leaves it (a snapshot + refs/main)."""
    import json

    repo = hub / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    for name, records in files.items():
        (snapshot / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    return repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache (and datasets cache) of this test: write dataset repos into it with
    `hub_dataset_repo`; nothing is downloaded (HF_HUB_OFFLINE=1)."""
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'tunelab[hub]')")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # arrow files of this test
    return tmp_path / "hub"


@contextlib.contextmanager
def interrupted_after_step(monkeypatch, step: int):
    """The run inside is interrupted (Ctrl-C) right after it logs step `step`'s training row,
    and must end in KeyboardInterrupt (with its checkpoint written)."""
    from tunelab.train.tracking import Tracker

    original_log = Tracker.log

    def log_then_interrupt(self, row):
        original_log(self, row)
        if row.get("step") == step and "loss" in row:
            raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log", log_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(Tracker, "log", original_log)

