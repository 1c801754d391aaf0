"""The ``hub`` ONNX layout: one folder that transformers.js, optimum's ``ORTModelFor*`` and (for LLaMA-style
decoders) onnxruntime-genai load as it is::

    OUT/config.json               the model's config in its family's layout (copied from a source folder)
    OUT/generation_config.json    causal LMs: bos / eos / pad ids (the source's own file where it has one)
    OUT/tokenizer.json ...        the tokenizer / preprocessor files of the source folder
    OUT/onnx/model.onnx           fp32, always
    OUT/onnx/model_fp16.onnx      fp16=True (its own trace)
    OUT/onnx/model_quantized.onnx int8=True (quantised from the validated model.onnx: no second trace)
    OUT/genai_config.json         causal LMs of a family whose descriptor names its onnxruntime-genai ``genai_type``

Every file is validated as :func:`ligo_convert.export.export_onnx` validates a flat one.  Everything is staged in a
hidden ``.OUT.*.partial`` folder beside OUT and renamed at the end.  When a validation fails the export stops there
(later files are not made), the failing file is renamed ``*.invalid.onnx`` and the staged folder is published as
``OUT.invalid`` (no genai_config.json), so nothing that looks finished is left; an older OUT being replaced is
removed, as a flat export removes an older file.  Exporting into the model's own folder (``grow --onnx``) publishes
only what the folder lacks: ``onnx/`` (``onnx.invalid/`` on failure), generation_config.json, genai_config.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import export as ex
from .canonical import CanonicalModel
from .checkpoint import carry_files
from .descriptors import get_descriptor
from .errors import LigoError
from .files import check_output, remove_leftovers

FP32, FP16, INT8 = "onnx/model.onnx", "onnx/model_fp16.onnx", "onnx/model_quantized.onnx"
GENAI_CONFIG = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class HubReport:
    """A hub export: the folder, the files written (relative to it) and each ONNX file's :class:`ExportReport`."""

    out: str  # the folder as it is now (``OUT.invalid`` / ``OUT/onnx.invalid`` when a validation failed)
    files: list[str] = field(default_factory=list)
    reports: list[ex.ExportReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    def failure(self) -> str:
        """One line naming the file that failed and why (empty when every file passed)."""
        bad = next((r for r in self.reports if not r.ok), None)
        return f"{Path(bad.path).name}: {bad.failure()}" if bad else ""

    def to_dict(self) -> dict:
        return {"out": self.out, "ok": self.ok, "files": self.files, "reports": [r.to_dict() for r in self.reports]}


def export_hub(model_or_folder, out_dir, *, fp16: bool = False, int8: bool = False, cache: bool | None = None,
               opset: int = ex.DEFAULT_OPSET, atol: float | None = None, overwrite: bool = False, data=None,
               text_column: str | None = None, log: Callable[[str], None] | None = None) -> HubReport:
    """Export a model (a :class:`CanonicalModel` or anything :func:`ligo_convert.load` takes) to the hub layout in
    ``out_dir`` and validate every ONNX file.  ``report.ok`` False: see the module notes for what is left.
    User errors (options, an existing ``out_dir`` without ``overwrite``) raise LigoError before anything is written."""
    ex.options.check(atol=(atol, "positive"), opset=(opset, "size"))
    model = ex._as_model(model_or_folder)
    source = Path(model.source) if model.source is not None and Path(model.source).is_dir() else None
    out = Path(out_dir).expanduser().absolute()
    in_place = source is not None and out.exists() and out.resolve() == source.resolve()
    target = out / "onnx" if in_place else out  # what gets renamed into place at the end
    check_output(target, overwrite=overwrite, sources=[] if in_place else [source], flag="--out")
    plans = {FP32: ex.plan_export(model, opset=opset, atol=atol, cache=cache, quantize="int8" if int8 else None,
                                  data=data, text_column=text_column)}
    if fp16:
        plans[FP16] = ex.plan_export(model, opset=opset, dtype="float16", atol=atol, cache=cache)
    config = model_config(model, source)
    genai = genai_config(model, config) if plans[FP32].cache else None
    reference = ex.reference_weights(plans[FP32])

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target, log=log)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        report = HubReport(str(out))
        _write_configs(stage, model, source, config, report.files)
        (stage / "onnx").mkdir()
        _export_files(model, plans, reference, stage, int8, report, log)
        if genai is not None and report.ok:
            (stage / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
            report.files.append(GENAI_CONFIG)
        _publish(stage, out, target, in_place, report)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def model_config(model: CanonicalModel, source: Path | None) -> dict:
    """The model's config.json: the source folder's own while the model is what was read from it, else written by
    its family's descriptor (keeping the keys of the config it was read with)."""
    from .canonical import unchanged
    from .files import read_json_object

    if source is not None and (source / "config.json").is_file() and unchanged(model):
        return read_json_object(source / "config.json")
    descriptor = get_descriptor(model.family)
    return descriptor.write_config(model.spec, model.config or None, model.dtype)


def generation_config(config: dict) -> dict:
    """A causal LM's generation_config.json from its config's special token ids (transformers' own fallback)."""
    return {"_from_model_config": True, **{k: config[k] for k in TOKEN_IDS if config.get(k) is not None}}


def genai_config(model: CanonicalModel, config: dict) -> dict | None:
    """onnxruntime-genai's genai_config.json for the cache graph ``onnx/model.onnx``, or None where the family's
    descriptor names no genai model type.  The graph's names and cache shapes are export.py's."""
    kind = get_descriptor(model.family).genai_type(config)
    if kind is None:
        return None
    spec = model.spec
    eos = config.get("eos_token_id")
    eos = eos if eos is not None else spec.vocab_size - 1
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id", spec.pad_token_id)
    context = spec.max_positions or 2048
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id") if config.get("bos_token_id") is not None else first_eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": FP32,
                "head_size": spec.head_dim,
                "hidden_size": spec.width,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads or spec.heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else first_eos,
            "type": kind,
            "vocab_size": spec.vocab_size,
        },
        # greedy by default, as `ligo-convert generate`; the cache grows with each step (present = past + new), so
        # the buffer is not shared between past and present
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _write_configs(stage: Path, model: CanonicalModel, source: Path | None, config: dict, files: list[str]) -> None:
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    if source is not None:
        files += carry_files(source, stage)
    if ex.has_cache(model.spec) and not (stage / GENERATION_CONFIG).exists():
        (stage / GENERATION_CONFIG).write_text(json.dumps(generation_config(config), indent=2) + "\n")
        files.append(GENERATION_CONFIG)


def _export_files(model, plans: dict, reference, stage: Path, int8: bool, report: HubReport, log) -> None:
    """fp32 (traced once), int8 from it, fp16 (its own trace), each validated; stops at the first failure."""
    fp32 = plans[FP32]
    meta = ex.export_metadata(fp32)
    path = stage / FP32
    data_name, seconds = ex.trace_and_write(fp32, reference, path, meta, path.name + ".data", [], log, FP32)
    checks, ok = ex.validate_step(fp32, path, reference, log)
    _add(report, stage, fp32, path, ok, "float32", data_name, seconds, checks)
    if not ok:
        return
    if int8:
        qpath = stage / INT8
        qdata = qpath.name + ".data" if data_name else None
        start = time.perf_counter()
        task, ok = ex.quantize_step(fp32, path, qpath, qdata, log)
        _add(report, stage, fp32, qpath, ok, "int8", qdata, time.perf_counter() - start, [], task)
        if not ok:
            return
    if FP16 in plans:
        half = plans[FP16]
        path = stage / FP16
        data_name, seconds = ex.trace_and_write(half, reference, path, ex.export_metadata(half),
                                                path.name + ".data", [], log, FP16)
        checks, ok = ex.validate_step(half, path, reference, log)
        _add(report, stage, half, path, ok, "float16", data_name, seconds, checks)


def _add(report: HubReport, stage: Path, plan, path: Path, ok: bool, dtype: str, data_name, seconds, checks,
         task=None) -> None:
    final = path if ok else ex.invalid_path(path)  # a failing file is renamed *.invalid.onnx at once
    path.replace(final)
    report.reports.append(ex.file_report(plan, final, ok, dtype, data_name, seconds, checks, task))


def _publish(stage: Path, out: Path, target: Path, in_place: bool, report: HubReport) -> None:
    """Rename the staged folder into place (``*.invalid`` when a validation failed) and point the reports at it."""
    ok = report.ok
    final = target if ok else target.with_name(target.name + ".invalid")
    onnx_files = sorted(p.name for p in (stage / "onnx").iterdir())
    if in_place:  # only what the model's folder lacks; onnx/ as one rename
        top = [n for n in report.files if ok and (not (out / n).exists() or n == GENAI_CONFIG)]
        for name in top:
            (stage / name).replace(out / name)
        report.files = top + [f"{final.name}/{n}" for n in onnx_files]
        _replace_folder(stage / "onnx", final)
        shutil.rmtree(stage, ignore_errors=True)
        base, moved = out, final
    else:
        report.files += [f"onnx/{n}" for n in onnx_files]
        _replace_folder(stage, final)
        base, moved = final, final / "onnx"
    if not ok and target.exists():  # an older export being replaced must not stay looking valid
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    for r in report.reports:
        r.path = str(moved / Path(r.path).name)
    report.out = str(base)


def _replace_folder(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old.partial")
        shutil.rmtree(old, ignore_errors=True)
        dst.replace(old)
        src.replace(dst)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        src.replace(dst)


def check_layout(layout: str) -> str:
    if layout not in ("flat", "hub"):
        raise LigoError(f"unknown --layout {layout!r}: choose flat (one .onnx file) or hub (a folder)")
    return layout
