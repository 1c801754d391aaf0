"""Helpers shared by the family tests: save a transformers model, compare files and outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_files(a: Path, b: Path) -> None:
    """Same key set, every tensor byte-identical (same dtype, shape and bytes)."""
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb), (set(ta) ^ set(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].view(torch.uint8) if ta[k].dtype == torch.bfloat16 else ta[k],
                           tb[k].view(torch.uint8) if tb[k].dtype == torch.bfloat16 else tb[k]), k


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def loading_problems(info: dict) -> dict:
    """The non-empty entries of transformers' ``output_loading_info`` (missing, unexpected, mismatched keys...)."""
    return {k: v for k, v in info.items() if v}
