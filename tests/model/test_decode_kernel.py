"""The slot decoder's attention that reads only each row's own columns (`model/decode_kernel.py`)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.model import decode_kernel
from tunelab.model.decode_kernel import decode_by_length, decode_by_length_reference


def case(groups: int, dim: int, dtype=torch.float32, device="cpu"):
    """Rows of a cache wider than the window (strided views, as the slot cache hands them over),
    lengths at and around the kernel's block edges."""
    torch.manual_seed(groups * 1000 + dim)
    rows, heads = 5, 2
    cache = torch.randn(2, 8, heads, 200, dim, dtype=dtype, device=device)
    key, value = cache[0, :rows, :, :150], cache[1, :rows, :, :150]
    query = torch.randn(rows, heads, groups, dim, dtype=dtype, device=device)
    lengths = torch.tensor([1, 64, 65, 150, 7], device=device)
    return query, key, value, lengths


@pytest.mark.parametrize("groups,dim", [(3, 64), (1, 64), (7, 128)])
def test_the_reference_is_each_rows_attention_over_its_own_columns(groups, dim):
    query, key, value, lengths = case(groups, dim)
    out = decode_by_length_reference(query, key, value, lengths, dim ** -0.5)
    for row, n in enumerate(lengths.tolist()):
        alone = F.scaled_dot_product_attention(query[row:row + 1], key[row:row + 1, :, :n], value[row:row + 1, :, :n])
        torch.testing.assert_close(out[row:row + 1], alone)


def kernel_equals_reference(groups: int, dim: int) -> None:
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    query, key, value, lengths = case(groups, dim, dtype, "cuda" if cuda else "cpu")
    out = decode_by_length(query, key, value, lengths, use_kernel=True)
    expected = decode_by_length_reference(query.float(), key.float(), value.float(), lengths, dim ** -0.5)
    tolerance = dict(atol=2e-2, rtol=2e-2) if cuda else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.skipif(not importlib.util.find_spec("triton"),
                    reason="needs Triton (on a GPU, or its CPU interpreter where Triton is installed)")
@pytest.mark.parametrize("groups,dim", [(3, 64), (1, 64), (7, 128), (4, 80)])
def test_the_kernel_equals_the_reference(groups, dim):
    """On a GPU in bf16; elsewhere in Triton's CPU interpreter, in a process of its own (the
    interpreter must be chosen before Triton builds anything)."""
    if torch.cuda.is_available():
        kernel_equals_reference(groups, dim)
        return
    code = f"from test_decode_kernel import kernel_equals_reference; kernel_equals_reference({groups}, {dim})"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_kernel_runs_on_cuda_in_half_precision_only(monkeypatch):
    cpu = torch.device("cpu")
    assert not decode_kernel.uses_kernel(cpu, torch.bfloat16)  # the CPU: masked SDPA
    monkeypatch.setattr(decode_kernel, "kernel_available", lambda device: True)
    assert decode_kernel.uses_kernel(cpu, torch.bfloat16) and decode_kernel.uses_kernel(cpu, torch.float16)
    assert not decode_kernel.uses_kernel(cpu, torch.float32)  # fp32: TF32 products would round it


def test_a_kernel_that_cannot_build_leaves_decoding_on_sdpa_with_a_warning(monkeypatch, caplog):
    """Triton needs the host's C compiler to build a kernel: where it fails, generation keeps the
    masked-SDPA path (checked once per device) instead of failing mid-evaluation."""
    def no_compiler():
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(decode_kernel, "_kernel", no_compiler)
    monkeypatch.setattr(logging.getLogger("tunelab"), "propagate", True)  # the CLI turns it off
    with caplog.at_level("WARNING", logger="tunelab"):
        assert decode_kernel._kernel_works.__wrapped__(torch.device("cpu")) is False
    assert "does not run here (RuntimeError: Failed to find C compiler" in caplog.text
