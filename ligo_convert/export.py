"""ONNX export of the canonical forward, proven against PyTorch with onnxruntime on every export.

One exporter serves every family: the canonical functional forward (:func:`ligo_convert.model.forward`) is wrapped in
a small module that holds the canonical tensors under their canonical names, and traced with the torch.export-based
exporter with a dynamic batch and (for token models) a dynamic sequence length.  Inputs and outputs follow from the
spec alone:

* ``spec.input == "patches"``: ``pixel_values`` (float32, batch × channels × image × image; the image size is fixed
  by the patch grid, except where the model resamples its position table for other sizes, as DINOv2: then height
  and width are dynamic, multiples of the patch size, validated at three sizes); token models: ``input_ids``, ``attention_mask`` and, when the spec has token types,
  ``token_type_ids`` (int64, batch × sequence).
* ``logits`` when the spec has a head; otherwise ``last_hidden_state``, with a pooler or a pooled token
  ``pooler_output``, and with a projection ``image_embeds`` / ``text_embeds``.
* Causal LMs export with a key/value cache (``cache=False``: the plain graph above): inputs ``input_ids``,
  ``attention_mask`` (past + new), ``position_ids`` and ``past_key_values.N.key`` / ``.value`` (batch × kv_heads ×
  past × head_dim, past 0 for the prefill); outputs ``logits`` and ``present.N.key`` / ``.value`` — the names optimum
  and transformers.js use, so one graph serves the prefill and every decoding step.

A model of two or more layers is traced in pieces — the start, one block per kind of layer, the finish — and its
graph written by copying the block once per layer (:mod:`ligo_convert.stitch`): the same floating-point ops as one
trace of the whole forward, in a fraction of the time.

Validation is always on: the written file is run with onnxruntime (CPU provider; also the CUDA provider when
onnxruntime-gpu and a GPU are there) at several input shapes — batch 1, a batch and a sequence length not used at
export — and compared with the fp32 PyTorch forward.  A cache graph is also run for a chunk of tokens after a past
and greedily decodes ``GENERATION_TOKENS`` tokens for a left-padded batch, prefill then one token a step through its
own cache, against PyTorch recomputing the whole sequence at every step: the same token at every step and logits
within the tolerance.  Past the tolerance the file is renamed ``*.invalid.onnx``.

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

from . import __version__, options
from .canonical import CanonicalModel, load
from .errors import LigoError
from .model import empty_cache, forward, forward_cached, positions_of
from .onnx_io import save_one_file
from .spec import Spec
from .stitch import Held, trace_stitched
from .threads import session_threads

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
CACHE_EXAMPLE = (3, 5)  # (new tokens, past length) at export of a cache graph: neither 0 nor 1, unequal to the batch
GENERATION_TOKENS = 16  # greedy steps the validation of a cache graph decodes
METADATA_PREFIX = "ligo_convert."
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Check:
    """One validation run: a provider, the input shapes, and the max abs difference of each output."""

    provider: str
    shapes: dict[str, list[int]]
    diffs: dict[str, float]
    error: str | None = None  # onnxruntime could not load or run the file
    mismatch: str | None = None  # generation: the first step where onnxruntime chose another token
    note: str | None = None  # generation: steps whose best two logits tie within the tolerance (not compared)

    def passed(self, atol: float) -> bool:
        return self.error is None and self.mismatch is None and all(d <= atol for d in self.diffs.values())


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
    kv_cache: bool = False  # a causal LM's graph with past_key_values inputs and present outputs
    task: list[dict] | None = None  # int8: each scheme's task check, the last is the file's (quantize.TaskCheck)

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
        for c in self.checks:
            if c.mismatch:
                return f"greedy decoding differs from PyTorch: {c.mismatch} ({c.provider})"
        if self.task and not self.task[-1]["passed"]:
            t = self.task[-1]
            return (f"the int8 file's {t['metric']} is {t['quantized']:.4f} against {t['reference']:.4f} in float32 "
                    f"({t['bound']} passes) on {t['data']}")
        bad = [(d, name, c) for c in self.checks for name, d in c.diffs.items() if d > self.atol]
        if not bad:
            return ""
        d, name, c = max(bad, key=lambda x: x[0])
        shape = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in c.shapes.items())
        return f"{name} differs from PyTorch by {d:.2e} > atol {self.atol:g} ({c.provider}, {shape})"

    def to_dict(self) -> dict:
        return {**asdict(self), "max_diff": self.max_diff}


# --- what goes in and out, decided from the spec alone -------------------------------------------------------------


def has_cache(spec: Spec) -> bool:
    """Whether the model can export with a key/value cache: a causal LM."""
    return spec.causal and spec.head == "lm"


def cache_names(spec: Spec, prefix: str) -> list[str]:
    """``past_key_values.N.key`` / ``.value`` (prefix "past_key_values") or ``present.N.*``, layer by layer."""
    return [f"{prefix}.{i}.{kv}" for i in range(spec.layers) for kv in ("key", "value")]


def input_names(spec: Spec, cache: bool = False) -> list[str]:
    if spec.input == "patches":
        return ["pixel_values"]
    if cache:
        return ["input_ids", "attention_mask", "position_ids"] + cache_names(spec, "past_key_values")
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.type_vocab_size else [])


_OUTPUTS = {"logits": "logits", "hidden": "last_hidden_state", "pooled": "pooler_output"}


def output_keys(spec: Spec) -> list[str]:
    """Keys of :func:`forward`'s result that the ONNX model returns, in order."""
    if spec.head != "none":
        return ["logits"]
    pooled = spec.pooler or spec.pool != "none"
    return ["hidden"] + (["pooled"] if pooled else []) + (["embeds"] if spec.projection else [])


def output_names(spec: Spec, cache: bool = False) -> list[str]:
    if cache:
        return ["logits"] + cache_names(spec, "present")
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
    if spec.input == "patches":  # ``seq``: (height, width) for models that take other image sizes
        height, width = seq if isinstance(seq, tuple) else (spec.image_size, spec.image_size)
        return {"pixel_values": torch.randn(batch, spec.num_channels, height, width, generator=g)}
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


def validation_shapes(spec: Spec) -> list[tuple[int, int | tuple[int, int] | None]]:
    """(batch, sequence) pairs to validate at: batch 1, unseen batches, and sequence lengths not used at export
    (image sizes other than the configured one, as (height, width), where the model takes them)."""
    if spec.input == "patches" and spec.interpolate_positions:  # the configured size, a wide one and a large one
        size, patch = spec.image_size, spec.patch_size
        return [(1, None), (3, (max(patch, size - patch), size + 2 * patch)), (EXPORT_BATCH, (2 * size, 2 * size))]
    if spec.input == "patches":
        return [(1, None), (3, None), (EXPORT_BATCH, None)]
    limit = max_sequence(spec) or 10**9
    seqs = [min(s, limit) for s in (5, 13, EXPORT_SEQ + 1)]
    return [(1, seqs[0]), (3, seqs[1]), (EXPORT_BATCH, seqs[2])]


# --- the traced module -----------------------------------------------------------------------------------------------


class CanonicalModule(Held):
    """The canonical forward as an ``nn.Module``: weights are (frozen) parameters under their canonical names, so the
    ONNX initializers the exporter keeps as they are carry those names too (``embed.tokens``; matrices it stores
    pre-transposed get generated names)."""

    def __init__(self, spec: Spec, weights: dict[str, torch.Tensor]):
        super().__init__(weights)
        self.spec = spec
        self.keys = output_keys(spec)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None):
        out = forward(self.spec, self.weights(), input_ids=input_ids, pixel_values=pixel_values,
                      attention_mask=attention_mask, token_type_ids=token_type_ids,
                      attention="explicit")  # plain ONNX ops, fused by onnxruntime
        return tuple(out[k] for k in self.keys)


class CachedModule(CanonicalModule):
    """A causal LM's step with a key/value cache (:func:`ligo_convert.model.forward_cached`): the past comes in as
    one flat (key, value, key, value, ...) tuple, the presents go out the same way after the logits."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.spec.layers)]
        logits, presents = forward_cached(self.spec, self.weights(), input_ids, attention_mask, position_ids, pairs)
        return (logits, *[t for kv in presents for t in kv])


def cache_inputs(spec: Spec, batch: int, seq: int, past: int = 0, seed: int = 0, dtype=torch.float32,
                 pad_left: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of a cache graph: ``seq`` new tokens after ``past`` cached ones (random keys and values), the
    last row's first ``pad_left`` places padding; position ids counted over the attended tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[-1, :pad_left] = 0
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask)[:, past:]}
    shape = (batch, spec.kv_heads, past, spec.head_dim)
    for name in cache_names(spec, "past_key_values"):
        out[name] = torch.randn(shape, generator=g).to(dtype)
    return out


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

    if not Path(path).is_file():
        raise LigoError(f"{path}: no such ONNX file (or a link to a missing one); export it with `ligo-convert export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise LigoError(f"{path}: not a readable ONNX file ({type(e).__name__}); export it again") from None
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def spec_of_onnx(path) -> Spec:
    from .files import spec_from_metadata

    meta = read_metadata(path)
    fix = "export it again with `ligo-convert export`"
    if "spec" not in meta:
        raise LigoError(f"{path}: has no ligo-convert spec in its metadata; {fix}")
    try:
        data = json.loads(meta["spec"])
    except json.JSONDecodeError as e:
        raise LigoError(f"{path}: metadata field {METADATA_PREFIX}spec is not valid JSON ({e}); {fix}") from None
    return spec_from_metadata(path, METADATA_PREFIX + "spec", data, fix)


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


def trace_inputs(spec: Spec, cache: bool = False, dtype=torch.float32) -> tuple[tuple, dict, object]:
    """What the exporter traces with: (args, kwargs, dynamic shapes) — dynamic batch and sequence (and past length;
    image height and width where the model takes other sizes)."""
    batch = torch.export.Dim("batch")
    seq_len = EXPORT_SEQ if max_sequence(spec) is None else min(EXPORT_SEQ, max_sequence(spec))
    args, kwargs = (), example_inputs(spec, EXPORT_BATCH, seq_len)
    if cache:
        # the mask spans past + new: its length is left to torch.export (Dim.AUTO), which finds that relation
        new, past = CACHE_EXAMPLE
        x = cache_inputs(spec, EXPORT_BATCH, new, past, dtype=dtype)
        sequence, past_len = torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
        args, kwargs = (x["input_ids"], x["attention_mask"], x["position_ids"],
                        *[x[n] for n in cache_names(spec, "past_key_values")]), {}
        dynamic = ({0: batch, 1: sequence}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: sequence},
                   tuple({0: batch, 2: past_len} for _ in range(2 * spec.layers)))
    elif spec.input == "patches" and spec.interpolate_positions:  # any image of whole patches
        rows, columns = torch.export.Dim("patch_rows", max=1024), torch.export.Dim("patch_columns", max=1024)
        dynamic = {"pixel_values": {0: batch, 2: spec.patch_size * rows, 3: spec.patch_size * columns}}
    elif spec.input == "patches":
        dynamic = {"pixel_values": {0: batch}}
    else:
        sequence = torch.export.Dim("sequence", max=max_sequence(spec) or 2**20)
        dynamic = {name: {0: batch, 1: sequence} for name in kwargs}
    return args, kwargs, dynamic


@contextlib.contextmanager
def exporter_errors():
    """The exporter's own errors run to pages: keep the line that names the cause, as a LigoError."""
    try:
        with _quiet():
            yield
    except Exception as e:
        lines = [_ANSI.sub("", ln).strip() for ln in str(e).splitlines()]
        cause = next((ln for ln in lines if ln.startswith("<class '")), None) or \
            f"{type(e).__name__}: {next((ln for ln in lines if ln), '')}"
        raise LigoError(f"the ONNX exporter cannot take this model ({cause[:300]})") from None


def name_axes(model, spec: Spec, cache: bool) -> None:
    """Axis names torch.export cannot give: the cache mask's length, optimum's names for the image axes."""
    import onnx_ir as ir

    if cache:
        mask = model.graph.inputs[1]
        mask.shape = ir.Shape([mask.shape[0], "past_sequence + sequence"])
        for present in model.graph.outputs[1:]:
            present.shape = ir.Shape([present.shape[0], present.shape[1], "past_sequence + sequence",
                                      present.shape[3]])
    elif spec.input == "patches" and spec.interpolate_positions:
        pixels = model.graph.inputs[0]
        pixels.shape = ir.Shape([pixels.shape[0], spec.num_channels, "height", "width"])


_REGISTRIES: dict = {}


@contextlib.contextmanager
def _one_registry():
    """``torch.onnx.export`` builds its table of ATen -> ONNX functions on every call (2-3 s on this CPU); a model
    traced in pieces makes several calls, and a process may export several files, so they share the first table
    made for each opset (no custom ops are ever registered in it).  Where torch's internals differ, nothing is
    cached."""
    try:
        from torch.onnx._internal.exporter import _registration

        owner = _registration.ONNXRegistry
        original = owner.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def shared(cls, opset_version=_registration._constants.TORCHLIB_OPSET):
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(cls, opset_version)
        return _REGISTRIES[opset_version]

    owner.from_torchlib = classmethod(shared)
    try:
        yield
    finally:
        owner.from_torchlib = original


def trace(spec: Spec, weights: dict[str, torch.Tensor], opset: int, cache: bool = False, stitched: bool = True):
    """torch.export -> ONNX, tidied; returns the ``onnx_ir`` model.  ``stitched``: from one traced block per kind of
    layer, copied per layer (:mod:`ligo_convert.stitch`; models of 2 or more layers), else one trace of the whole
    forward — the same ops either way."""
    with exporter_errors(), _one_registry():
        if stitched and spec.layers > 1:
            model = trace_stitched(spec, weights, opset, cache)
        else:
            module = (CachedModule if cache else CanonicalModule)(spec, weights).eval()
            args, kwargs, dynamic = trace_inputs(spec, cache, next(iter(weights.values())).dtype)
            model = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                      input_names=input_names(spec, cache), output_names=output_names(spec, cache),
                                      dynamic_shapes=dynamic, verbose=False, optimize=False).model
        tidy(model)
    name_axes(model, spec, cache)
    return model


def tidy(model) -> None:
    """The onnxscript optimizer that ``torch.onnx.export(optimize=True)`` runs, less its pattern rewriter: inline,
    fold constants, drop what is unused, lift constants to initializers, deduplicate, common subexpressions.  The
    rewriter took ~20 % of a BERT-base export and gave onnxruntime nothing it does not do itself at session start
    (same outputs bit for bit, same latency: ``benchmarks/onnx_latency.py --vs-optimum``)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    fold_constants_ir(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


def _write(model, out: Path, meta: dict[str, str], data_name: str | None) -> None:
    import onnx_ir as ir

    model.metadata_props.update(meta)
    if data_name is None:  # one file: the weights written straight from the tensors (onnx_io)
        save_one_file(model, out)
    else:
        ir.save(model, out, external_data=data_name)


# onnxruntime's graph fusions that make single-threaded CPU inference slower (onnxruntime 1.32): SkipLayerNormFusion
# turns each residual Add + LayerNormalization into a SkipLayerNormalization, whose CPU kernel on one thread is slower
# than the two ops; without it BERT-base-, GPT-2-small- and ViT-B-sized files ran 8-21 % faster on 1 thread, but 3-15 %
# slower on 2 (`python benchmarks/onnx_latency.py --vs-optimum`, results/onnx_vs_optimum.md).  Other providers and
# thread counts keep every fusion.
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion",)


def session_kwargs(provider: str, threads: int) -> dict:
    """What our own sessions pass to ``onnxruntime.InferenceSession`` beside the options."""
    if provider == "CPUExecutionProvider" and threads == 1:
        return {"disabled_optimizers": list(CPU_DISABLED_FUSIONS)}
    return {}


def _session(path: Path, provider: str):
    ort = _runtime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads = session_threads()
    return ort.InferenceSession(str(path), opts, providers=[provider], **session_kwargs(provider, threads))


def validate(path, model: CanonicalModel, atol: float, reference: dict[str, torch.Tensor] | None = None,
             log: Callable[[str], None] | None = None) -> list[Check]:
    """Run the ONNX file at every validation shape with every provider and compare each output with the fp32
    PyTorch forward (a cache graph also decodes greedily); returns the checks (the caller compares them with
    ``atol``)."""
    spec = model.spec
    weights = reference if reference is not None else model.materialize(torch.float32)
    checks = []
    for provider in providers():
        try:
            session = _session(Path(path), provider)
        except Exception as e:  # a broken graph or a missing data file: the export is not valid
            checks.append(Check(provider, {}, {}, _first_line(e)))
            _say(log, provider, f"onnxruntime cannot load it: {_first_line(e)}")
            continue
        wanted = [i.name for i in session.get_inputs()]
        cache = any(n.startswith("past_key_values.") for n in wanted)
        if sorted(wanted) != sorted(input_names(spec, cache)):
            raise LigoError(f"{path}: inputs {wanted} do not match this model's {input_names(spec, cache)}; is it "
                            f"the ONNX file of this model?")
        runs = _cache_runs(spec, weights, session, atol) if cache else _plain_runs(spec, weights, session)
        for check in runs:
            checks.append(_logged(check, provider, atol, log))
    return checks


def _say(log, provider: str, text: str) -> None:
    if log:
        log(f"  {provider.removesuffix('ExecutionProvider')}: {text}")


def _logged(check: Check, provider: str, atol: float, log) -> Check:
    check.provider = provider
    if log:
        shape = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in check.shapes.items())
        if check.error:
            text = f"onnxruntime failed: {check.error}"
        else:
            text = ", ".join(f"{k} max abs diff {v:.2e}" for k, v in check.diffs.items())
            if check.mismatch:
                text += f"; {check.mismatch}"
            elif "new_tokens" in check.shapes:
                text += "; the same greedy tokens" + (f" ({check.note})" if check.note else "")
            text += "  " + ("ok" if check.passed(atol) else "FAIL")
        log(f"  {provider.removesuffix('ExecutionProvider')} {shape}: {text}")
    return check


def _run(session, names: list[str], feed: dict[str, torch.Tensor], shapes: dict) -> tuple[list | None, Check | None]:
    try:
        return session.run(names, {k: v.numpy() for k, v in feed.items()}), None
    except Exception as e:  # e.g. a shape the graph wrongly fixed at export
        return None, Check("", shapes, {}, _first_line(e))


def _diff(value: np.ndarray, expected: torch.Tensor, keep: torch.Tensor | None = None, axis: int = 1) -> float:
    """Max abs difference; with ``keep`` (B, S) only at the places ``axis`` of which are attended: a padding place's
    output is never read (where a row's keys are all padding, kernels differ in how they spread its attention)."""
    expected = expected.float().numpy()
    if value.shape != expected.shape:
        return float("inf")
    diff = np.abs(value.astype(np.float32) - expected)
    if keep is not None:
        diff = np.moveaxis(np.moveaxis(diff, axis, 1)[keep.numpy().astype(bool)], 0, 0)
    return float(diff.max()) if diff.size else 0.0


def _plain_runs(spec: Spec, weights, session):
    names = output_names(spec)
    for n, (batch, seq) in enumerate(validation_shapes(spec)):
        inputs = example_inputs(spec, batch, seq, seed=100 + n)
        shapes = {k: list(v.shape) for k, v in inputs.items()}
        with torch.no_grad():
            ref = forward(spec, weights, **inputs)
        got, failed = _run(session, names, inputs, shapes)
        if failed:
            yield failed
            continue
        yield Check("", shapes, {name: _diff(value, ref[key])
                                 for key, name, value in zip(output_keys(spec), names, got)})


def _past_dtype(session) -> torch.dtype:
    past = next(i for i in session.get_inputs() if i.name.startswith("past_key_values."))
    return torch.float16 if past.type == "tensor(float16)" else torch.float32


def _cache_runs(spec: Spec, weights, session, atol: float):
    """A cache graph: the prefill (empty past) at the validation shapes, a chunk after a past, greedy decoding."""
    names = output_names(spec, cache=True)
    dtype = _past_dtype(session)
    limit = max_sequence(spec) or 10**9
    presents = None
    for n, (batch, seq) in enumerate(validation_shapes(spec)):
        inputs = cache_inputs(spec, batch, seq, 0, seed=100 + n, dtype=dtype, pad_left=seq // 3)
        shapes = {"input_ids": [batch, seq], "past": [0]}
        with torch.no_grad():
            logits, ref = _reference(spec, weights, inputs)
        got, failed = _run(session, names, inputs, shapes)
        if failed:
            yield failed
            continue
        keep = inputs["attention_mask"]
        yield Check("", shapes, {"logits": _diff(got[0], logits, keep),
                                 "present": max(_diff(g, r, keep, axis=2) for g, r in zip(got[1:], ref))})
        presents = (inputs, got)
    if presents is not None:  # the last prefill's cache, then 3 new tokens at once: against the whole recomputed
        inputs, got = presents
        batch, past = inputs["input_ids"].shape[0], inputs["attention_mask"].shape[1]
        new = max(1, min(3, limit - past))
        g = torch.Generator().manual_seed(7)
        ids = torch.cat([inputs["input_ids"], torch.randint(0, spec.vocab_size, (batch, new), generator=g)], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, new, dtype=torch.int64)], 1)
        step = {"input_ids": ids[:, past:], "attention_mask": mask, "position_ids": positions_of(mask)[:, past:]}
        step.update({name: torch.from_numpy(v) for name, v in zip(cache_names(spec, "past_key_values"), got[1:])})
        with torch.no_grad():
            whole, _ = forward_cached(spec, weights, ids, mask, positions_of(mask), empty_cache(spec, batch))
        shapes = {"input_ids": [batch, new], "past": [past]}
        out, failed = _run(session, names[:1], step, shapes)
        yield failed or Check("", shapes, {"logits": _diff(out[0], whole[:, past:], mask[:, past:])})
    yield _generation_check(spec, weights, session, names, dtype, limit, atol)


def _reference(spec: Spec, weights, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    past = [(inputs[f"past_key_values.{i}.key"].float(), inputs[f"past_key_values.{i}.value"].float())
            for i in range(spec.layers)]
    logits, presents = forward_cached(spec, weights, inputs["input_ids"], inputs["attention_mask"],
                                      inputs["position_ids"], past)
    return logits, [t for kv in presents for t in kv]


def _generation_check(spec: Spec, weights, session, names: list[str], dtype, limit: int, atol: float,
                      batch: int = 2, prompt: int = 7) -> Check:
    """Greedy decoding of a left-padded batch: onnxruntime through its cache (prefill, then one token a step, each
    time its own choice), then every step against PyTorch recomputing the whole sequence without a cache.  One
    causal forward over the final sequence gives at each place exactly the logits a recompute at that step gives
    (no place sees a later one), so it replaces one full forward a step.  A tie between the two best logits within
    the tolerance may go either way (the rest stays comparable: the reference runs on onnxruntime's own tokens);
    where the best two differ by more than that, onnxruntime must choose PyTorch's token."""
    new = max(1, min(GENERATION_TOKENS, limit - prompt))
    inputs = cache_inputs(spec, batch, prompt, 0, seed=11, dtype=dtype, pad_left=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    shapes = {"prompt": [batch, prompt], "new_tokens": [new]}
    steps, feed = [], inputs
    for step in range(new):
        got, failed = _run(session, names, feed, shapes)
        if failed:
            return failed
        steps.append(got[0][:, -1].astype(np.float32))
        chosen = torch.from_numpy(steps[-1]).argmax(-1)
        if step == new - 1:
            break
        ids = torch.cat([ids, chosen[:, None]], 1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
        feed = {"input_ids": chosen[:, None], "attention_mask": mask, "position_ids": positions_of(mask)[:, -1:]}
        feed.update({name: torch.from_numpy(v) for name, v in zip(cache_names(spec, "past_key_values"), got[1:])})
    with torch.no_grad():
        whole, _ = forward_cached(spec, weights, ids, mask, positions_of(mask), empty_cache(spec, batch))
    diff, ties = 0.0, 0
    for step, ours in enumerate(steps):
        expected = whole[:, prompt - 1 + step]
        diff = max(diff, _diff(ours, expected))
        top2 = expected.topk(2, dim=-1).values
        chosen, wanted = torch.from_numpy(ours).argmax(-1), expected.argmax(-1)
        for row in range(batch):
            if chosen[row] != wanted[row]:
                if top2[row, 0] - top2[row, 1] > 2 * atol:
                    return Check("", shapes, {"logits": diff}, mismatch=(
                        f"step {step + 1}, row {row}: token {int(chosen[row])} instead of {int(wanted[row])}"))
                ties += 1
    return Check("", shapes, {"logits": diff}, note=f"{ties} tie(s) within the tolerance" if ties else None)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def invalid_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".onnx") + ".invalid.onnx")


def export_onnx(model_or_folder, out, *, opset: int = DEFAULT_OPSET, dtype: str = "float32", atol: float | None = None,
                overwrite: bool = False, source: str | None = None, extra_metadata: dict[str, str] | None = None,
                cache: bool | None = None, quantize: str | None = None, data=None, text_column: str | None = None,
                log: Callable[[str], None] | None = None) -> ExportReport:
    """Export a model (a :class:`CanonicalModel`, or anything :func:`ligo_convert.load` takes) to ``out`` (.onnx)
    and validate it with onnxruntime against the fp32 PyTorch forward.  ``cache``: a causal LM's graph with a
    key/value cache (default: for every causal LM; False: the plain graph without one).  ``quantize="int8"``: the
    validated fp32 graph quantised (:mod:`ligo_convert.quantize`) and validated on the task, on ``data`` (default:
    the embedded digits or text; ``text_column`` for tables) — ``report.task`` holds the figures.

    Returns the :class:`ExportReport`; when ``report.ok`` is False the file was renamed ``*.invalid.onnx``
    (``report.path``).  User errors (unknown dtype, unsupported model, missing onnxruntime, existing output)
    raise :class:`LigoError` before anything is written.
    """
    options.check(atol=(atol, "positive"), opset=(opset, "size"))
    out = _check_onnx_out(Path(out), overwrite)
    plan = plan_export(model_or_folder, opset=opset, dtype=dtype, atol=atol, cache=cache, quantize=quantize,
                       data=data, text_column=text_column)
    reference = reference_weights(plan)
    meta = export_metadata(plan, source, extra_metadata)
    # write under a temporary name: a crash leaves no file that looks like a finished export.  The external data
    # file (large models only) gets its final name at once, since the model file refers to it by name; an int8
    # file is made from a validated fp32 one, whose weights (large models) go to a temporary data file.
    pid = os.getpid()
    tmp = out.with_name(f".{out.name}.{pid}.tmp.onnx")
    final_data = out.name + ".data"
    temporary = [tmp]
    task = None
    try:
        data_name, seconds = trace_and_write(plan, reference, tmp, meta, f".{out.name}.{pid}.fp32.data" if quantize
                                             else final_data, temporary, log, out.name)
        checks, ok = validate_step(plan, tmp, reference, log)
        if quantize and ok:
            quantized = out.with_name(f".{out.name}.{pid}.int8.tmp.onnx")
            int8_data = final_data if data_name else None
            temporary += [quantized] + ([out.parent / int8_data] if int8_data else [])
            task, ok = quantize_step(plan, tmp, quantized, int8_data, log)
            tmp.unlink()
            if data_name:
                (out.parent / data_name).unlink(missing_ok=True)
            tmp, data_name = quantized, int8_data
    except BaseException:
        for path in temporary:
            path.unlink(missing_ok=True)
        raise
    final = publish_file(tmp, out, ok)
    return file_report(plan, final, ok, quantize or dtype, data_name, seconds, checks, task)


# --- the steps of an export, shared by export_onnx and layout.export_hub ---------------------------------------------


@dataclass
class ExportPlan:
    """What one ONNX file will be, every option checked: made by :func:`plan_export` before any work."""

    model: CanonicalModel
    dtype: str
    opset: int
    tol: float
    cache: bool
    quantize: str | None
    tokenizer_dir: Path | None
    data: object = None
    text_column: str | None = None

    @property
    def spec(self) -> Spec:
        return self.model.spec


def _check_onnx_out(out: Path, overwrite: bool) -> Path:
    from .files import check_output

    if out.suffix != ".onnx":
        raise LigoError(f"{out}: the output file must end in .onnx")
    check_output(out, overwrite=overwrite, kind="file")
    if not out.parent.is_dir():
        raise LigoError(f"{out.parent}: no such folder for the output file")
    return out


def plan_export(model_or_folder, *, opset: int = DEFAULT_OPSET, dtype: str = "float32", atol: float | None = None,
                cache: bool | None = None, quantize: str | None = None, data=None,
                text_column: str | None = None) -> ExportPlan:
    """Check every option of one export (LigoError naming the flag) and load the model: nothing is written."""
    options.check(atol=(atol, "positive"), opset=(opset, "size"))
    if quantize not in (None, "int8"):
        raise LigoError(f"cannot quantize to {quantize!r}: choose int8 (onnxruntime's dynamic quantisation)")
    if quantize and dtype != "float32":
        raise LigoError("--quantize int8 quantizes the float32 graph; leave --dtype at float32")
    model = _as_model(model_or_folder)
    spec = model.spec
    _check_exportable(spec, dtype, opset)
    cache = has_cache(spec) if cache is None else bool(cache)
    if cache and not has_cache(spec):
        raise LigoError("only a causal LM exports with a key/value cache; export this model without --cache")
    _runtime()
    tokenizer_dir = Path(model.source) if model.source is not None and Path(model.source).is_dir() else None
    if quantize:
        from .quantize import check_data

        check_data(spec, data, tokenizer_dir, text_column)
    tol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    return ExportPlan(model, dtype, opset, tol, cache, quantize, tokenizer_dir, data, text_column)


def reference_weights(plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The fp32 weights every file of the model is traced from and validated against."""
    reference = plan.model.materialize(torch.float32)
    _check_shapes(plan.spec, reference)
    return reference


def export_metadata(plan: ExportPlan, source: str | None = None, extra: dict[str, str] | None = None) -> dict:
    meta = metadata(plan.model, plan.dtype, source)
    meta.update({METADATA_PREFIX + k: v for k, v in (extra or {}).items()})
    return meta


def trace_and_write(plan: ExportPlan, reference: dict[str, torch.Tensor], path: Path, meta: dict[str, str],
                    large_data_name: str, temporary: list[Path], log=None, shown: str | None = None
                    ) -> tuple[str | None, float]:
    """Trace the model in ``plan.dtype`` and write it to ``path``; above protobuf's limit its weights go to
    ``large_data_name`` beside it.  Files about to be written are added to ``temporary`` (the caller's clean-up).
    Returns (the data file's name or None, seconds)."""
    torch_dtype = DTYPES[plan.dtype]
    weights = reference if torch_dtype == torch.float32 else {k: v.to(torch_dtype) for k, v in reference.items()}
    start = time.perf_counter()
    model = trace(plan.spec, weights, plan.opset, plan.cache)
    # measured on the graph, not the weights: the exporter may fold a transposed copy of a tied matrix into it
    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data_name = large_data_name if nbytes >= EXTERNAL_DATA_THRESHOLD else None
    temporary += [path] + ([path.parent / data_name] if data_name else [])
    _write(model, path, meta, data_name)
    del model
    seconds = time.perf_counter() - start
    if log:
        log(f"exported {shown or path.name} ({plan.dtype}, opset {plan.opset}) in {seconds:.1f} s; validating with "
            f"onnxruntime (atol {plan.tol:g})")
    return data_name, seconds


def validate_step(plan: ExportPlan, path: Path, reference, log=None) -> tuple[list[Check], bool]:
    checks = validate(path, plan.model, plan.tol, reference=reference, log=log)
    return checks, all(c.passed(plan.tol) for c in checks)


def quantize_step(plan: ExportPlan, fp32: Path, out: Path, data_name: str | None, log=None) -> tuple[list, bool]:
    """The validated fp32 file ``fp32`` quantised into ``out`` and validated on the task: (checks, passed)."""
    from .quantize import quantize_validated

    if log:
        log("quantizing to int8 and validating it on the task")
    task = quantize_validated(fp32, out, plan.model, plan.data, plan.tokenizer_dir, plan.text_column, data_name, log)
    return task, task[-1].passed


def publish_file(tmp: Path, out: Path, ok: bool) -> Path:
    """Give a written file its final name: ``out``, or ``*.invalid.onnx`` when validation failed."""
    final = out if ok else invalid_path(out)
    if not ok:
        out.unlink(missing_ok=True)  # an older export being replaced must not stay looking valid either
    os.replace(tmp, final)
    return final


def file_report(plan: ExportPlan, path: Path, ok: bool, dtype: str, data_name: str | None, seconds: float,
                checks: list[Check], task=None) -> ExportReport:
    size = path.stat().st_size + ((path.parent / data_name).stat().st_size if data_name else 0)
    return ExportReport(str(path), ok, dtype, plan.opset, plan.tol, input_names(plan.spec, plan.cache),
                        output_names(plan.spec, plan.cache), data_name, size, seconds, checks, plan.cache,
                        [t.to_dict() for t in task] if task else None)


def check_onnx(path, model_or_folder, atol: float | None = None, log: Callable[[str], None] | None = None
               ) -> ExportReport:
    """Validate an existing ONNX file against a model without exporting (the file is left as it is)."""
    path = Path(path)
    if not path.is_file():
        raise LigoError(f"{path}: no such ONNX file")
    model = _as_model(model_or_folder)
    meta = read_metadata(path)
    dtype = meta.get("dtype", "float32")
    if dtype == "int8":  # validated on the task, as at export
        from .quantize import task_check

        source = model.source if model.source is not None and Path(model.source).is_dir() else None
        task = task_check(path, model, "as written", tokenizer_dir=source)
        if log:
            log(f"  {task.line()}")
        cache = any(i.startswith("past_key_values.") for i in _input_names_of(path))
        return ExportReport(str(path), task.passed, dtype, _opset_of(path), 0.0, input_names(model.spec, cache),
                            output_names(model.spec, cache), None, path.stat().st_size, 0.0, [], cache,
                            [task.to_dict()])
    tol = DEFAULT_ATOL.get(dtype, DEFAULT_ATOL["float32"]) if atol is None else float(atol)
    checks = validate(path, model, tol, log=log)
    ok = all(c.passed(tol) for c in checks)
    cache = any("new_tokens" in c.shapes for c in checks)
    return ExportReport(str(path), ok, dtype, _opset_of(path), tol, input_names(model.spec, cache),
                        output_names(model.spec, cache), None, path.stat().st_size, 0.0, checks, cache)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _input_names_of(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
