"""Checks the family tests (tests/test_family_*.py) share: a randomised transformers source, padded text inputs,
transformers' outputs, an unchanged round trip, a config written from the descriptor alone, the one-line refusals of
the command line, growth that may refuse, and transformers' own loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import LigoError, data, from_tensors, forward, load, save
from ligo_convert.cli import main
from ligo_convert.grow import grow
from helpers import assert_same_files, loading_problems, max_diff

# --- sources and inputs ---------------------------------------------------------------------------------------------


def randomise_norms(model, also: tuple[str, ...] = ()) -> None:
    """transformers leaves norm weights at 1 (Gemma's at 0) and biases at 0: draw every norm tensor and bias (and
    every parameter whose name holds one of ``also``) from N(0.5, 0.1), biases from N(0, 0.1), so that a swapped or
    dropped tensor shows in the outputs.  Drawn in parameter order from torch's global generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or any(part in name for part in also):
                p.normal_(0.0 if name.endswith("bias") else 0.5, 0.1)


def save_randomised(cls: str, config, folder: Path, also: tuple[str, ...] = ()):
    """transformers' ``cls`` made from ``config`` in eval mode, norms and biases randomised (``randomise_norms``),
    saved to ``folder``."""
    model = getattr(transformers, cls)(config).eval()
    randomise_norms(model, also)
    model.save_pretrained(folder)
    return model


def build_case(cases: dict, tmp_path: Path, case: str, folder: str = "src"):
    """Case ``case`` of a table id -> (model class, config factory, family): its model saved randomised
    (``save_randomised``) to tmp_path/folder, and its family."""
    cls, config, family = cases[case]
    return save_randomised(cls, config(), tmp_path / folder), family


def padded_text_inputs(pad_token_id: int) -> dict:
    """Two sequences of 7, the second right-padded with the pad id (RoBERTa's positions skip padding tokens)."""
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = pad_token_id
    return dict(input_ids=ids, attention_mask=mask)


def reference(model, x: dict) -> dict:
    """transformers' outputs on ``x``: {"logits"} for a head, else {"hidden"} and {"pooled"} where there is one."""
    with torch.no_grad():
        out = model(**x)
    if hasattr(out, "logits"):
        return {"logits": out.logits}
    ref = {"hidden": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        ref["pooled"] = out.pooler_output
    return ref


def kept(t: torch.Tensor, x: dict) -> torch.Tensor:
    """The non-padded places of ``x`` (what a causal model's padded place holds is not part of the answer)."""
    return t[x["attention_mask"].bool()]


# --- reading and comparing ------------------------------------------------------------------------------------------


def read_whole(folder: Path, family: str):
    """Our read of ``folder``: the given family, every tensor mapped and none dropped."""
    ours = load(folder)
    assert ours.family == family
    assert ours.mapping.unmapped == [] and ours.mapping.dropped == []
    return ours


def our_outputs(ours, x: dict, **kw) -> dict:
    """Our canonical forward of what ``load`` read, on ``x``."""
    with torch.no_grad():
        return forward(ours.spec, ours.materialize(), **x, **kw)


def assert_close(ref: dict, out: dict, padded: dict | None = None, tol: float = 1e-5) -> None:
    """Each of ``ref``'s outputs is in ``out`` and within ``tol`` of it (at the non-padded places of the inputs
    ``padded`` only, where given)."""
    assert set(ref) <= set(out), (sorted(ref), sorted(out))
    for k, v in ref.items():
        a, b = (v, out[k]) if padded is None else (kept(v, padded), kept(out[k], padded))
        assert max_diff(a, b) <= tol, (k, max_diff(a, b))


def assert_identical(first, second, x: dict | None = None) -> None:
    """The same outputs bit for bit: two tensors, or two dicts of them (over ``first``'s keys).  ``x`` is unused: the
    signature of ``check_round_trip``'s ``same_outputs``."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
        return
    for k in first:
        assert torch.equal(first[k], second[k]), k


def hf_load(cls, folder: Path, what=None, **from_pretrained):
    """transformers' ``cls`` loads ``folder`` whole (no missing, unexpected or mismatched keys); in eval mode.
    ``what`` is named in the failure."""
    again, info = cls.from_pretrained(folder, output_loading_info=True, **from_pretrained)
    assert loading_problems(info) == {}, (what, info)
    return again.eval()


def same_config(src_folder: Path, out_folder: Path, keys, every_key: bool = False):
    """transformers reads the same config class from both folders and the same value of each of ``keys`` (of those the
    source's class has, or of every one with ``every_key``).  Returns the two configs (source, written)."""
    src = transformers.AutoConfig.from_pretrained(src_folder)
    out = transformers.AutoConfig.from_pretrained(out_folder)
    assert type(out) is type(src)
    for key in keys:
        if every_key or hasattr(src, key):
            assert getattr(out, key) == getattr(src, key), (key, getattr(out, key), getattr(src, key))
    return src, out


def edit_config(folder: Path, **changes) -> dict:
    """Set keys of ``folder``/config.json (a value of DELETE removes the key); returns the config written."""
    path = folder / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    config = {k: v for k, v in config.items() if v is not DELETE}
    path.write_text(json.dumps(config))
    return config


DELETE = object()


# --- writing --------------------------------------------------------------------------------------------------------


def check_round_trip(tmp_path: Path, model, cls, inputs, reference, compared, same_outputs=assert_identical,
                     every_key: bool = False, **from_pretrained):
    """tmp_path/src (saved from ``model``) read and written unchanged to tmp_path/out: the files are byte-identical;
    transformers' ``cls`` loads them whole and computes what ``model`` computes on ``inputs()`` (``reference(model,
    x)``, compared by ``same_outputs(first, second, x)``: bit for bit by default); transformers reads the same config
    values of ``compared`` (``same_config``); and our spec read back from out is the one written.  Returns (our read
    of src, transformers' source config, its written config)."""
    ours = load(tmp_path / "src")
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")
    again = hf_load(cls, tmp_path / "out", **from_pretrained)
    x = inputs()
    same_outputs(reference(model, x), reference(again, x), x)
    src, out = same_config(tmp_path / "src", tmp_path / "out", compared, every_key)
    assert load(tmp_path / "out").spec == ours.spec
    return ours, src, out


def from_template(tmp_path: Path, model, family: str, auto_cls, **from_pretrained):
    """A model made in memory (as growth makes one) has no source config: tmp_path/src's weights written to
    tmp_path/out from ``family``'s descriptor alone name ``model``'s model type and class, and transformers' Auto
    class ``auto_cls`` loads them whole into that class.  Returns (our read of src, the loaded model in eval mode)."""
    ours = load(tmp_path / "src")
    save(from_tensors(ours.spec, ours.materialize(), family), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == model.config.model_type
    assert written["architectures"] == [type(model).__name__]
    again, info = auto_cls.from_pretrained(tmp_path / "out", output_loading_info=True, **from_pretrained)
    assert type(again) is type(model)
    assert loading_problems(info) == {}
    return ours, again.eval()


def from_template_same_files(tmp_path: Path, cls, family: str | None = None):
    """tmp_path/src's weights written to tmp_path/fresh from the descriptor of ``family`` (by default the family
    read) alone, with no source config: the same files byte for byte, which transformers' ``cls`` loads whole.
    Returns (our read of src, its weights, the loaded model in eval mode)."""
    ours = load(tmp_path / "src")
    weights = ours.materialize()
    save(from_tensors(ours.spec, weights, family or ours.family), tmp_path / "fresh")
    assert_same_files(tmp_path / "src", tmp_path / "fresh")
    return ours, weights, hf_load(cls, tmp_path / "fresh")


# --- refusals -------------------------------------------------------------------------------------------------------


def refused_to_write(spec, weights, family: str, out: Path, match: str) -> None:
    """Writing ``weights`` of ``spec`` as ``family`` to ``out`` raises a LigoError matching ``match``; nothing is
    written."""
    with pytest.raises(LigoError, match=match):
        save(from_tensors(spec, weights, family), out)
    assert not out.exists()


def assert_one_line_error(result, *texts: str) -> None:
    """A command-line run that exited 2 with one line on stderr, ``error: ...``, naming each of ``texts``."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in texts:
        assert text in lines[0], result.stderr


def refused_by_cli(tmp_path: Path, text: str, leaves: list[str] | None = None) -> None:
    """`convert` and `inspect` of tmp_path/src exit 2 with one line naming ``text``; nothing is written: tmp_path
    holds what it held (exactly the names ``leaves``, where given)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["convert", tmp_path / "src", "--out", tmp_path / "out"], ["inspect", tmp_path / "src"]):
        assert_one_line_error(CliRunner().invoke(main, [str(a) for a in args]), text)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (before if leaves is None else leaves)


def refused(tmp_path: Path, key: str, leaves: list[str] | None = None) -> None:
    """Reading tmp_path/src raises a LigoError matching ``key``, and the command line refuses it
    (``refused_by_cli``)."""
    with pytest.raises(LigoError, match=key):
        load(tmp_path / "src")
    refused_by_cli(tmp_path, key, leaves)


# --- growth and evaluation ------------------------------------------------------------------------------------------


def grown_or_refused(src: Path, out: Path, method: str, **grow_kw):
    """``grow`` src into out by ``method``: our read of out, or None where the method refuses what it cannot do
    losslessly (then in one line, with nothing written)."""
    try:
        grow(src, out=out, method=method, **grow_kw)
    except LigoError as e:
        assert "\n" not in str(e) and not out.exists(), (method, str(e))
        return None
    return load(out)


def growth_report(folder: Path, method: str) -> dict:
    """The growth.json written to ``folder``, which names ``method``."""
    report = json.loads((folder / "growth.json").read_text())
    assert report["method"] == method
    return report


def transformers_loss(model, folder: Path, **batches) -> float:
    """transformers' own loss of ``model`` on the first validation piece (``data.VAL_CHUNK`` examples) for
    ``folder``: what ``evaluate(..., max_batches=1)`` reads, whatever its batch size."""
    options = {**batches, "batch_size": data.VAL_CHUNK}
    batch = next(data.val_batches(load(folder).spec, None, folder, **options))
    with torch.no_grad():
        return model(**data.model_inputs(batch), labels=batch["labels"]).loss.item()
