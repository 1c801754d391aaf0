"""ONNX export of the canonical forward, proven against PyTorch with onnxruntime on every export.

One exporter serves every family: the canonical functional forward (:func:`ligo_convert.model.forward`) is wrapped in
a small module that holds the canonical tensors under their canonical names, and traced with the torch.export-based
exporter with a dynamic batch and (for token models) a dynamic sequence length.  Inputs and outputs follow from the
spec alone:

* ``spec.input == "patches"``: ``pixel_values`` (float32, batch × channels × image × image; the image size is fixed
  by the patch grid); token models: ``input_ids``, ``attention_mask`` and, when the spec has token types,
  ``token_type_ids`` (int64, batch × sequence).
* ``logits`` when the spec has a head; otherwise ``last_hidden_state``, with a pooler or a pooled token
  ``pooler_output``, and with a projection ``image_embeds`` / ``text_embeds``.

Validation is always on: the written file is run with onnxruntime (CPU provider; also the CUDA provider when
onnxruntime-gpu and a GPU are there) at several input shapes — batch 1, a batch and a sequence length not used at
export — and compared with the fp32 PyTorch forward.  Past the tolerance the file is renamed ``*.invalid.onnx``.

Files: one ``.onnx`` file when the weights fit in protobuf's 2 GB limit; above it the weights go to ONE external data
file named after the model file plus ``.data`` (``model.onnx`` -> ``model.onnx.data``), which must stay beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import __version__, options
from .canonical import CanonicalModel, load
from .errors import LigoError
from .model import forward
from .spec import Spec

# 20, not the exporter's floor of 18: opset 20 has a Gelu op, so GELU is one node (which onnxruntime fuses with
# the preceding bias into BiasGelu) instead of five elementwise ones; same values, validated on every export.
# onnxruntime reads opset 20 since 1.16; --opset 18 still works for older runtimes.
DEFAULT_OPSET = 20
# Max abs difference against the fp32 PyTorch forward.  fp32: kernels differ only in summation order.  fp16: the
# weights and activations are rounded to 11 significant bits (relative step ~1e-3 on values of order 1-10), so the
# default is 100x looser; pass an explicit atol for models with large logits.
DEFAULT_ATOL = {"float32": 1e-4, "float16": 1e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Protobuf refuses messages of 2 GB or more; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
EXPORT_BATCH = 2  # example batch at export; dims of size 0 or 1 would be specialised by torch.export
EXPORT_SEQ = 8  # example sequence length at export; validation uses others
METADATA_PREFIX = "ligo_convert."
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Check:
    """One validation run: a provider, the input shapes, and the max abs difference of each output."""

    provider: str
    shapes: dict[str, list[int]]
    diffs: dict[str, float]
    error: str | None = None  # onnxruntime could not load or run the file

    def passed(self, atol: float) -> bool:
        return self.error is None and all(d <= atol for d in self.diffs.values())


@dataclass
class ExportReport:
    path: str  # the file as it is now (``*.invalid.onnx`` when validation failed)
    ok: bool
    dtype: str
    opset: int
    atol: float
    inputs: list[str]
    outputs: list[str]
    external_data: str | None = None  # name of the external data file beside ``path``, if any
    size_bytes: int = 0
    export_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        if any(c.error for c in self.checks):
            return float("inf")
        return max((d for c in self.checks for d in c.diffs.values()), default=float("nan"))

    def failure(self) -> str:
        """One line saying why validation failed (empty when it passed)."""
        for c in self.checks:
            if c.error:
                return f"onnxruntime ({c.provider}) failed: {c.error}"
        bad = [(d, name, c) for c in self.checks for name, d in c.diffs.items() if d > self.atol]
        if not bad:
            return ""
        d, name, c = max(bad, key=lambda x: x[0])
        shape = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in c.shapes.items())
        return f"{name} differs from PyTorch by {d:.2e} > atol {self.atol:g} ({c.provider}, {shape})"

    def to_dict(self) -> dict:
        return {**asdict(self), "max_diff": self.max_diff}


# --- what goes in and out, decided from the spec alone -------------------------------------------------------------


def input_names(spec: Spec) -> list[str]:
    if spec.input == "patches":
        return ["pixel_values"]
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.type_vocab_size else [])


_OUTPUTS = {"logits": "logits", "hidden": "last_hidden_state", "pooled": "pooler_output"}


def output_keys(spec: Spec) -> list[str]:
    """Keys of :func:`forward`'s result that the ONNX model returns, in order."""
    if spec.head != "none":
        return ["logits"]
    pooled = spec.pooler or spec.pool != "none"
    return ["hidden"] + (["pooled"] if pooled else []) + (["embeds"] if spec.projection else [])


def output_names(spec: Spec) -> list[str]:
    # projected embeddings are named by modality, as transformers names them (image_embeds / text_embeds)
    embeds = "image_embeds" if spec.input == "patches" else "text_embeds"
    return [embeds if k == "embeds" else _OUTPUTS[k] for k in output_keys(spec)]


def max_sequence(spec: Spec) -> int | None:
    """Longest token sequence the model takes (learned position table), None when unlimited; None for images."""
    if spec.input == "patches" or spec.positions != "learned":
        return None
    return spec.max_positions - spec.position_offset


def example_inputs(spec: Spec, batch: int, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of one shape.  Token batches pad the tail of their last row (with the pad id where the spec has
    one) so the mask path is exercised."""
    g = torch.Generator().manual_seed(seed)
    if spec.input == "patches":
        return {"pixel_values": torch.randn(batch, spec.num_channels, spec.image_size, spec.image_size, generator=g)}
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1 and seq > 2:
        mask[-1, seq - seq // 3:] = 0
        if spec.pad_token_id is not None:
            ids[-1, seq - seq // 3:] = spec.pad_token_id
    out = {"input_ids": ids, "attention_mask": mask}
    if spec.type_vocab_size:
        types = torch.zeros(batch, seq, dtype=torch.int64)
        if spec.type_vocab_size > 1:
            types[:, seq // 2:] = 1
        out["token_type_ids"] = types
    return out


def validation_shapes(spec: Spec) -> list[tuple[int, int | None]]:
    """(batch, sequence) pairs to validate at: batch 1, unseen batches, and sequence lengths not used at export."""
    if spec.input == "patches":
        return [(1, None), (3, None), (EXPORT_BATCH, None)]
    limit = max_sequence(spec) or 10**9
    seqs = [min(s, limit) for s in (5, 13, EXPORT_SEQ + 1)]
    return [(1, seqs[0]), (3, seqs[1]), (EXPORT_BATCH, seqs[2])]


# --- the traced module -----------------------------------------------------------------------------------------------


class CanonicalModule(nn.Module):
    """The canonical forward as an ``nn.Module``: weights are (frozen) parameters under their canonical names, so the
    ONNX initializers the exporter keeps as they are carry those names too (``embed.tokens``; matrices it stores
    pre-transposed get generated names)."""

    def __init__(self, spec: Spec, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.names = list(weights)
        self.keys = output_keys(spec)
        for name, tensor in weights.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None):
        w = {name: self.get_parameter(name) for name in self.names}
        out = forward(self.spec, w, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                      token_type_ids=token_type_ids, attention="explicit")  # plain ONNX ops, fused by onnxruntime
        return tuple(out[k] for k in self.keys)


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise LigoError("onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu for CUDA) to "
                        "export and validate ONNX models") from None
    return onnxruntime


def providers() -> list[str]:
    """Providers to validate with: CPU always, CUDA too when onnxruntime-gpu and a GPU are present."""
    ort = _runtime()
    out = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        out.append("CUDAExecutionProvider")
    return out


def _as_model(model_or_folder) -> CanonicalModel:
    if isinstance(model_or_folder, CanonicalModel):
        return model_or_folder
    return load(model_or_folder)


def _check_exportable(spec: Spec, dtype: str, opset: int) -> None:
    try:
        spec.check()
    except ValueError as e:
        raise LigoError(f"cannot export this model: {e}") from None
    if dtype not in DTYPES:
        raise LigoError(f"cannot export as {dtype}: choose one of {', '.join(DTYPES)} (onnxruntime's CPU provider "
                        f"has no {dtype} kernels)")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= newest:
        raise LigoError(f"opset {opset} is not supported: the torch.export-based exporter needs 18..{newest}")
    limit = max_sequence(spec)
    if limit is not None and limit < 2:
        raise LigoError(f"cannot export this model with a dynamic sequence length: its position table allows only "
                        f"{limit} token(s)")


def _check_shapes(spec: Spec, weights: dict[str, torch.Tensor]) -> None:
    """A model whose tensors disagree with its spec (e.g. a half-finished growth) would fail deep in tracing."""
    for name in spec.tensor_names():
        if name not in weights:
            raise LigoError(f"cannot export this model: tensor {name} is missing for its spec")
        if tuple(weights[name].shape) != spec.shape_of(name):
            raise LigoError(f"cannot export this model: tensor {name} has shape {tuple(weights[name].shape)}, its "
                            f"spec says {spec.shape_of(name)}")


def metadata(model: CanonicalModel, dtype: str, source: str | None = None) -> dict[str, str]:
    """What the ONNX file records about its origin (``metadata_props``); ``eval`` reads the spec back from it."""
    src = source if source is not None else (str(model.source) if model.source is not None else "")
    return {
        METADATA_PREFIX + "family": model.family,
        METADATA_PREFIX + "spec": json.dumps(model.spec.to_dict(), sort_keys=True),
        METADATA_PREFIX + "source": src,
        METADATA_PREFIX + "dtype": dtype,
        METADATA_PREFIX + "version": __version__,
    }


def read_metadata(path) -> dict[str, str]:
    """The ligo-convert metadata of an ONNX file (without loading its weights)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise LigoError(f"{path}: not a readable ONNX file ({type(e).__name__}); export it again") from None
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def spec_of_onnx(path) -> Spec:
    meta = read_metadata(path)
    if "spec" not in meta:
        raise LigoError(f"{path}: has no ligo-convert spec in its metadata; export it with `ligo-convert export`")
    return Spec.from_dict(json.loads(meta["spec"]))


@contextlib.contextmanager
def _quiet():
    """The exporter warns about things that are not the user's business (torchvision missing, axis renames) and
    logs each failed tracing attempt at length; our own report says what matters."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch._subclasses",
                                               "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace(module: CanonicalModule, spec: Spec, opset: int):
    """torch.export -> ONNX, dynamic batch and sequence; returns the ``ONNXProgram``."""
    batch = torch.export.Dim("batch")
    seq_len = EXPORT_SEQ if max_sequence(spec) is None else min(EXPORT_SEQ, max_sequence(spec))
    kwargs = example_inputs(spec, EXPORT_BATCH, seq_len)
    if spec.input == "patches":
        dynamic = {"pixel_values": {0: batch}}
    else:
        sequence = torch.export.Dim("sequence", max=max_sequence(spec) or 2**20)
        dynamic = {name: {0: batch, 1: sequence} for name in kwargs}
    try:
        with _quiet():
            return torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, opset_version=opset,
                                     input_names=list(kwargs), output_names=output_names(spec),
                                     dynamic_shapes=dynamic, verbose=False)
    except Exception as e:  # the exporter's own errors run to pages: keep the line that names the cause
        lines = [_ANSI.sub("", ln).strip() for ln in str(e).splitlines()]
        cause = next((ln for ln in lines if ln.startswith("<class '")), None) or \
            f"{type(e).__name__}: {next((ln for ln in lines if ln), '')}"
        raise LigoError(f"the ONNX exporter cannot take this model ({cause[:300]})") from None


def _write(program, out: Path, meta: dict[str, str], data_name: str | None) -> None:
    import onnx_ir as ir

    program.model.metadata_props.update(meta)
    ir.save(program.model, out, external_data=data_name)


def _session(path: Path, provider: str):
    ort = _runtime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=[provider])


def validate(path, model: CanonicalModel, atol: float, reference: dict[str, torch.Tensor] | None = None,
             log: Callable[[str], None] | None = None) -> list[Check]:
    """Run the ONNX file at every validation shape with every provider and compare each output with the fp32
    PyTorch forward; returns the checks (the caller compares them with ``atol``)."""
    spec = model.spec
    weights = reference if reference is not None else model.materialize(torch.float32)
    names = output_names(spec)
    checks = []
    for provider in providers():
        try:
            session = _session(Path(path), provider)
        except Exception as e:  # a broken graph or a missing data file: the export is not valid
            checks.append(Check(provider, {}, {}, _first_line(e)))
            if log:
                log(f"  {provider.removesuffix('ExecutionProvider')}: onnxruntime cannot load it: {_first_line(e)}")
            continue
        wanted = [i.name for i in session.get_inputs()]
        for n, (batch, seq) in enumerate(validation_shapes(spec)):
            inputs = example_inputs(spec, batch, seq, seed=100 + n)
            if sorted(wanted) != sorted(inputs):
                raise LigoError(f"{path}: inputs {wanted} do not match this model's {list(inputs)}; is it the "
                                f"ONNX file of this model?")
            with torch.no_grad():
                ref = forward(spec, weights, **inputs)
            try:
                got = session.run(names, {k: v.numpy() for k, v in inputs.items()})
            except Exception as e:  # e.g. a shape the graph wrongly fixed at export
                checks.append(Check(provider, {k: list(v.shape) for k, v in inputs.items()}, {}, _first_line(e)))
                if log:
                    log(f"  {provider.removesuffix('ExecutionProvider')}: onnxruntime failed: {_first_line(e)}")
                continue
            diffs = {}
            for key, name, value in zip(output_keys(spec), names, got):
                expected = ref[key].float().numpy()
                if value.shape != expected.shape:
                    diffs[name] = float("inf")
                else:
                    diffs[name] = float(np.abs(value.astype(np.float32) - expected).max())
            check = Check(provider, {k: list(v.shape) for k, v in inputs.items()}, diffs)
            checks.append(check)
            if log:
                shape = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in check.shapes.items())
                verdict = "ok" if check.passed(atol) else "FAIL"
                log(f"  {provider.removesuffix('ExecutionProvider')} {shape}: " +
                    ", ".join(f"{k} max abs diff {v:.2e}" for k, v in diffs.items()) + f"  {verdict}")
    return checks


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def invalid_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".onnx") + ".invalid.onnx")


def export_onnx(model_or_folder, out, *, opset: int = DEFAULT_OPSET, dtype: str = "float32", atol: float | None = None,
                overwrite: bool = False, source: str | None = None, extra_metadata: dict[str, str] | None = None,
                log: Callable[[str], None] | None = None) -> ExportReport:
    """Export a model (a :class:`CanonicalModel`, or anything :func:`ligo_convert.load` takes) to ``out`` (.onnx)
    and validate it with onnxruntime against the fp32 PyTorch forward.

    Returns the :class:`ExportReport`; when ``report.ok`` is False the file was renamed ``*.invalid.onnx``
    (``report.path``).  User errors (unknown dtype, unsupported model, missing onnxruntime, existing output)
    raise :class:`LigoError` before anything is written.
    """
    out = Path(out)
    options.check(atol=(atol, "positive"), opset=(opset, "size"))
    if out.suffix != ".onnx":
        raise LigoError(f"{out}: the output file must end in .onnx")
    if out.exists() and not overwrite:
        raise LigoError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise LigoError(f"{out.parent}: no such folder for the output file")
    model = _as_model(model_or_folder)
    spec = model.spec
    _check_exportable(spec, dtype, opset)
    _runtime()
    tol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    torch_dtype = DTYPES[dtype]

    reference = model.materialize(torch.float32)
    _check_shapes(spec, reference)
    weights = reference if torch_dtype == torch.float32 else {k: v.to(torch_dtype) for k, v in reference.items()}
    start = time.perf_counter()
    program = _trace(CanonicalModule(spec, weights).eval(), spec, opset)
    meta = metadata(model, dtype, source)
    meta.update({METADATA_PREFIX + k: v for k, v in (extra_metadata or {}).items()})

    # write under a temporary name: a crash leaves no file that looks like a finished export.  The external data
    # file (large models only) gets its final name at once, since the model file refers to it by name.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    # measured on the graph, not the weights: the exporter may fold a transposed copy of a tied matrix into it
    nbytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                 if v.const_value is not None)
    data_name = out.name + ".data" if nbytes >= EXTERNAL_DATA_THRESHOLD else None
    try:
        _write(program, tmp, meta, data_name)
        del program
        seconds = time.perf_counter() - start
        if log:
            log(f"exported {out.name} ({dtype}, opset {opset}) in {seconds:.1f} s; validating with onnxruntime "
                f"(atol {tol:g})")
        checks = validate(tmp, model, tol, reference=reference, log=log)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if data_name:
            (out.parent / data_name).unlink(missing_ok=True)
        raise
    ok = all(c.passed(tol) for c in checks)
    final = out if ok else invalid_path(out)
    if not ok:
        out.unlink(missing_ok=True)  # an older export being replaced must not stay looking valid either
    os.replace(tmp, final)
    size = final.stat().st_size + ((out.parent / data_name).stat().st_size if data_name else 0)
    return ExportReport(str(final), ok, dtype, opset, tol, input_names(spec), output_names(spec), data_name, size,
                        seconds, checks)


def check_onnx(path, model_or_folder, atol: float | None = None, log: Callable[[str], None] | None = None
               ) -> ExportReport:
    """Validate an existing ONNX file against a model without exporting (the file is left as it is)."""
    path = Path(path)
    if not path.is_file():
        raise LigoError(f"{path}: no such ONNX file")
    model = _as_model(model_or_folder)
    meta = read_metadata(path)
    dtype = meta.get("dtype", "float32")
    tol = DEFAULT_ATOL.get(dtype, DEFAULT_ATOL["float32"]) if atol is None else float(atol)
    checks = validate(path, model, tol, log=log)
    ok = all(c.passed(tol) for c in checks)
    return ExportReport(str(path), ok, dtype, _opset_of(path), tol,
                        input_names(model.spec), output_names(model.spec), None, path.stat().st_size, 0.0, checks)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
