"""int8 ONNX files, validated on the task instead of at 1e-4.

``quantize_file`` applies onnxruntime's dynamic quantisation to a validated fp32 export: the weights of every linear
layer to int8 per output channel (per-tensor scales lost 5 points of per-token cosine on MiniLM against 0.1 for
per-channel, at the same speed), the activations quantised on the fly; matrix products between two activations
(attention scores) stay float.  ``task_check`` then scores the int8 file and the fp32 PyTorch model on the same
batches of the embedded (or given) data:

* classifiers: accuracy within ``ACCURACY_POINTS`` points;
* masked and causal LMs: perplexity within ``PERPLEXITY_RATIO`` (relative);
* encoders and towers without a head: mean per-token cosine of the last hidden state >= ``MIN_COSINE``;
* per-token binary heads (ELECTRA's discriminator): the same decision on >= ``MIN_AGREEMENT`` of the tokens.

``SCHEMES`` are tried in order, the fastest first; the first that passes is kept and its name recorded (MiniLM
needs its MLP down projections kept in float: mean cosine 0.989 with every layer in int8, 0.994 without those).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import data as data_mod
from .canonical import CanonicalModel
from .errors import LigoError
from .model import forward
from .objectives import evaluate_metrics
from .spec import Spec

METADATA_PREFIX = "ligo_convert."  # as export.METADATA_PREFIX (export imports this module lazily)

ACCURACY_POINTS = 1.0
PERPLEXITY_RATIO = 0.02
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.99
VALIDATION_BATCHES = 8
# (name, substrings of the weight names whose products stay float), fastest first
SCHEMES = (("int8 per channel, every linear layer", ()),
           ("int8 per channel, MLP down projections kept in float", (".fc2.",)))


@dataclass
class TaskCheck:
    """The int8 file against the fp32 PyTorch model on the same batches."""

    scheme: str
    metric: str  # "accuracy", "perplexity", "token cosine" or "token agreement"
    reference: float  # fp32 PyTorch
    quantized: float  # int8 onnxruntime
    bound: str  # what passes, in words
    passed: bool
    data: str
    count: int  # examples or tokens scored

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (f"{self.metric} {self.quantized:.4f} (int8) vs {self.reference:.4f} (fp32) over {self.count} "
                f"{'examples' if self.metric == 'accuracy' else 'tokens'} of {self.data}, {self.bound}: {verdict}")


def check_data(spec: Spec, data, tokenizer_dir, text_column: str | None = None) -> None:
    """Refuse, before anything is exported, data the task check cannot score this model on."""
    try:
        batch = next(iter(_batches(spec, data, tokenizer_dir, text_column)), None)
    except LigoError as e:
        raise LigoError(f"cannot validate an int8 file on this data: {e}") from None
    if batch is None:
        raise LigoError("cannot validate an int8 file: the data has no validation split; pass --data")
    if spec.head == "classifier" and int(batch["labels"].max()) >= spec.num_classes:
        raise LigoError(f"cannot validate an int8 file on {data_mod.describe(spec, data, text_column)}: its labels "
                        f"go beyond the model's {spec.num_classes} classes; pass --data with this model's classes")


def _batches(spec: Spec, data, tokenizer_dir, text_column):
    stream = data_mod.batches(spec, data, tokenizer_dir=tokenizer_dir, split="val", batch_size=16, seq_len=64,
                              seed=0, repeat=False, workers=0, text_column=text_column)
    for n, batch in enumerate(stream):
        if n == VALIDATION_BATCHES:
            return
        yield batch


def weight_products(path: Path, keep_float: tuple[str, ...]) -> list[str]:
    """Names of the matrix products (as onnxruntime's quantiser names them) whose weight matches ``keep_float``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = []
    for node in proto.graph.node:
        if node.op_type in ("Gemm", "MatMul") and any(k in i for i in node.input for k in keep_float):
            # the quantiser splits a Gemm into MatMul + Add first and quantises the MatMul under this name
            out.append(node.name + "_MatMul" if node.op_type == "Gemm" else node.name)
    return out


def quantize_file(src: Path, dst: Path, keep_float: tuple[str, ...] = (), data_name: str | None = None) -> None:
    """Dynamic int8 quantisation of ``src`` into ``dst`` (metadata kept; weights in the file ``data_name`` beside
    it when given)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="ligo-int8-", dir=dst.parent) as scratch:
        staged = Path(scratch) / "model.onnx"
        quantize_dynamic(str(src), str(staged), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=weight_products(src, keep_float),
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=data_name is not None)
        proto = onnx.load(str(staged))
    original = onnx.load(str(src), load_external_data=False)
    meta = {p.key: p.value for p in original.metadata_props} | {METADATA_PREFIX + "dtype": "int8"}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    if keep_float:  # the exclusion goes by the quantiser's node names: prove it took
        int8 = [i.name for i in proto.graph.initializer if i.name.endswith("_quantized")]
        missing = [n for n in (i.name for i in original.graph.initializer) if any(k in n for k in keep_float)
                   and any(q.startswith(n) for q in int8)]
        if missing:
            raise RuntimeError(f"onnxruntime's quantiser quantised {missing[0]}, which was to stay float")
    onnx.save(proto, str(dst), save_as_external_data=data_name is not None, location=data_name)


def task_check(path: Path, model: CanonicalModel, scheme: str, data=None, tokenizer_dir=None,
               text_column: str | None = None) -> TaskCheck:
    """Score the int8 file ``path`` and the fp32 PyTorch model on the same validation batches."""
    from .evaluate import _OnnxRunner
    from .export import output_keys

    spec = model.spec
    weights = model.materialize(torch.float32)
    run = _OnnxRunner(path, spec)
    ref_totals = q_totals = None
    sums = {"similar": 0.0, "count": 0}
    for batch in _batches(spec, data, tokenizer_dir, text_column):
        with torch.no_grad():
            ref = forward(spec, weights, **data_mod.model_inputs(batch))
        got = run(batch)[output_keys(spec)[0]]  # the file's first output: logits, or the last hidden state without a head
        if spec.head in ("classifier", "mlm", "lm"):
            ref_totals = evaluate_metrics(spec, ref, batch, ref_totals)
            q_totals = evaluate_metrics(spec, {"logits": got}, batch, q_totals)
            continue
        keep = batch["attention_mask"].bool() if "attention_mask" in batch else None
        if spec.head == "token_binary":
            same = (got > 0) == (ref["logits"] > 0)
        else:
            same = F.cosine_similarity(got.float(), ref["hidden"].float(), dim=-1)
        same = same[keep] if keep is not None else same.flatten()
        sums["similar"] += float(same.float().sum())
        sums["count"] += same.numel()
    what = data_mod.describe(spec, data, text_column)
    if spec.head == "classifier":
        r, q = ref_totals["accuracy"], q_totals["accuracy"]
        return TaskCheck(scheme, "accuracy", r, q, f"within {ACCURACY_POINTS:g} point",
                         abs(q - r) * 100 <= ACCURACY_POINTS, what, ref_totals["count"])
    if spec.head in ("mlm", "lm"):
        r, q = ref_totals["perplexity"], q_totals["perplexity"]
        ok = math.isfinite(q) and q <= r * (1 + PERPLEXITY_RATIO)
        return TaskCheck(scheme, "perplexity", r, q, f"within {PERPLEXITY_RATIO:.0%}", ok, what, ref_totals["count"])
    mean = sums["similar"] / max(sums["count"], 1)
    if spec.head == "token_binary":
        return TaskCheck(scheme, "token agreement", 1.0, mean, f">= {MIN_AGREEMENT:g}", mean >= MIN_AGREEMENT,
                         what, sums["count"])
    return TaskCheck(scheme, "token cosine", 1.0, mean, f"mean >= {MIN_COSINE:g}", mean >= MIN_COSINE, what,
                     sums["count"])


def quantize_validated(fp32: Path, out: Path, model: CanonicalModel, data=None, tokenizer_dir=None,
                       text_column: str | None = None, data_name: str | None = None,
                       log: Callable[[str], None] | None = None) -> list[TaskCheck]:
    """Quantise ``fp32`` into ``out`` with each scheme in turn until one passes its task check; returns the checks
    (the last one is what ``out`` holds)."""
    checks = []
    for name, keep_float in SCHEMES:
        out.unlink(missing_ok=True)
        quantize_file(fp32, out, keep_float, data_name)
        check = task_check(out, model, name, data, tokenizer_dir, text_column)
        checks.append(check)
        if log:
            log(f"  {name}: {check.line()}")
        if check.passed:
            break
    return checks
