"""Task metrics of a model with PyTorch or onnxruntime: accuracy and loss for classifiers, loss, perplexity and
token accuracy for masked and causal LMs; for towers without a head and ELECTRA's discriminator, the probes of
``ligo_convert.probes`` (k-NN for images, span retrieval for text, replaced-token detection).

Both engines read the same batches (``data.batches``, deterministic for a seed, masking included) and score them with
the same code (``objectives.evaluate_metrics``); only the forward differs, so their numbers agree to the export
tolerance.  The ONNX engine takes an exported ``.onnx`` file (its spec is read from the file's metadata) or a model,
which it exports and validates into a temporary folder first.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import probes
from .canonical import CanonicalModel, load
from .errors import LigoError
from .model import forward, positions_of
from .objectives import evaluate_metrics
from .spec import Spec

ENGINES = ("torch", "onnx")
DEFAULT_MAX_BATCHES = data_mod.VAL_PIECES  # the embedded text's held-out part alone is thousands of batches


def _is_onnx_file(model) -> bool:
    return not isinstance(model, CanonicalModel) and str(model).endswith(".onnx")


def _tokenizer_dir(source) -> Path | None:
    """The folder whose tokenizer.json / preprocessor_config.json the data should use, when it exists."""
    if source is None or str(source) == "":
        return None
    path = Path(source)
    return path if path.is_dir() else None


class _OnnxRunner:
    def __init__(self, path: Path, spec: Spec):
        from .export import _session, output_keys, output_names, providers

        best = providers()[-1]  # CUDA when onnxruntime-gpu and a GPU are there (raises LigoError without onnxruntime)
        try:
            self.session = _session(path, best)
        except Exception as e:  # a corrupt file or a missing external data file
            raise LigoError(f"{path}: onnxruntime cannot load it ({type(e).__name__}); export it again") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.names = output_names(spec)
        self.keys = output_keys(spec)  # what forward calls them
        if self.names[0] not in [o.name for o in self.session.get_outputs()]:
            raise LigoError(f"{path}: has no {self.names[0]!r} output; export it with `ligo-convert export`")

    def __call__(self, batch: dict) -> dict:
        feed = {}
        for name in self.inputs:
            if name.startswith("past_key_values."):  # a cache graph scores a whole batch as its prefill
                past = next(i for i in self.session.get_inputs() if i.name == name)
                dtype = np.float16 if past.type == "tensor(float16)" else np.float32
                feed[name] = np.zeros((batch["input_ids"].shape[0], past.shape[1], 0, past.shape[3]), dtype)
            elif name == "position_ids" and "attention_mask" in batch:
                feed[name] = positions_of(batch["attention_mask"]).numpy()
            elif name not in batch:
                raise LigoError(f"the ONNX model wants input {name!r}, which the data does not give")
            else:
                feed[name] = batch[name].numpy()
        return {k: torch.from_numpy(v) for k, v in zip(self.keys, self.session.run(self.names, feed))}


def evaluate(model, data=None, engine: str = "torch", split: str = "val", batch_size: int = 16, seq_len: int = 64,
             max_batches: int | None = DEFAULT_MAX_BATCHES, seed: int = 0, tokenizer_dir=None, *,
             workers: int | None = None, text_column: str | None = None) -> dict:
    """Metrics of ``model`` (a :class:`CanonicalModel`, a source :func:`load` takes, or with ``engine="onnx"`` an
    exported ``.onnx`` file) on ``data`` (None: the embedded digits or standard-library text).

    Returns ``loss``, ``accuracy`` (classes, masked tokens or next tokens), ``perplexity`` (LMs), ``count`` (examples
    or predicted tokens) and what was read.  ``max_batches`` None or 0 reads the whole split; on ``val`` it counts
    pieces of ``data.VAL_CHUNK`` examples (the same examples and masks whatever ``batch_size`` and ``seed``, and
    those grow's reported validation loss reads with as many ``eval_batches``), on ``train`` batches.  ``workers`` (image
    folders' loader processes) and ``text_column`` (a table's text column) go to :func:`data.batches`.
    """
    if engine not in ENGINES:
        raise LigoError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if max_batches is not None and max_batches < 0:
        raise LigoError(f"--max-batches must be 0 (all) or more, not {max_batches}")
    if engine == "onnx" and _is_onnx_file(model):
        from .export import read_metadata, spec_of_onnx

        if not Path(model).is_file():
            raise LigoError(f"{model}: no such ONNX file")
        canonical, spec, source = None, spec_of_onnx(model), read_metadata(model).get("source")
    elif _is_onnx_file(model):
        raise LigoError(f"{model}: is an ONNX file; evaluate it with --engine onnx, or pass the checkpoint folder "
                        f"for --engine torch")
    else:
        canonical = model if isinstance(model, CanonicalModel) else load(model)
        spec, source = canonical.spec, canonical.source
    with tempfile.TemporaryDirectory(prefix="ligo-eval-") as tmp:
        if engine == "onnx":
            path = Path(model) if canonical is None else None
            if canonical is not None:  # export first, proven like any export
                from .export import export_onnx

                path = Path(tmp) / "model.onnx"
                report = export_onnx(canonical, path)
                if not report.ok:
                    raise LigoError(f"the ONNX export of this model failed validation: {report.failure()}")
            run = _OnnxRunner(path, spec)
        else:
            weights = canonical.materialize(torch.float32)

            def run(batch):
                with torch.no_grad():
                    return forward(spec, weights, **data_mod.model_inputs(batch))

        tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else _tokenizer_dir(source)
        options = {"workers": workers, "text_column": text_column}  # the forward runs on the CPU: nothing to pin
        if split == "val":  # the examples grow's validation reads too, whatever batch_size (data.val_batches)
            stream = data_mod.val_batches(spec, data, tokenizer_dir, batch_size, seq_len, max_batches, **options)
        else:
            stream = itertools.islice(data_mod.batches(spec, data, tokenizer_dir, split, batch_size, seq_len, seed,
                                                       repeat=False, **options), max_batches or None)
        counter = _Counted(stream)
        probe = probes.probe_of(spec)
        if probe is None:
            totals = None
            for batch in counter:
                totals = evaluate_metrics(spec, run(batch), batch, totals)
        else:
            totals = _probe(probe, spec, run, counter, data, tokenizer_dir, batch_size, seed, options)
    if totals is None or not totals["count"]:
        raise LigoError(f"no {split} data for this model")
    return _report(spec, engine, model, data, text_column, split, counter.count, totals, probe)


class _Counted:
    """Batches, counted as they are read."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.count += 1
            yield batch


def _probe(probe: str, spec: Spec, run, batches, data, tokenizer_dir, batch_size: int, seed: int,
           options: dict) -> dict:
    """The probe's running sums (``loss``/``accuracy`` as ``evaluate_metrics`` gives them; no loss for k-NN and
    span retrieval)."""
    if probe == "knn":
        memory = probes.memory_batches(spec, data, tokenizer_dir, batch_size, seed, **options)
        sums = probes.knn_probe(spec, run, memory, batches)
    else:
        encoder = data_mod.TextEncoder(spec, tokenizer_dir)
        prefix, suffix = len(encoder.prefix), len(encoder.suffix)
        if probe == "span":
            sums = probes.span_retrieval(spec, run, batches, prefix, suffix)
        else:
            g = torch.Generator().manual_seed(seed + 1)
            sums = None
            for batch in batches:
                batch = probes.replace_tokens(batch, prefix, suffix, spec.vocab_size, g)
                sums = probes.rtd_metrics(run(batch), batch, sums)
            return sums
    return {**sums, "loss": None, "accuracy": sums["correct"] / max(sums["count"], 1)}


def _report(spec: Spec, engine: str, model, data, text_column, split: str, batches: int, totals: dict,
            probe: str | None) -> dict:
    counted = {"knn": "images", "span": "sequences", "rtd": "text tokens", None: (
        "examples" if spec.head == "classifier" else ("masked tokens" if spec.head == "mlm" else "next tokens"))}
    out = {
        "engine": engine,
        "model": str(model.source if isinstance(model, CanonicalModel) else model),
        "data": data_mod.describe(spec, data, text_column),
        "split": split,
        "batches": batches,
        "count": totals["count"],
        "counted": counted[probe],
        "loss": totals["loss"],
        "accuracy": totals["accuracy"],
    }
    if probe is not None:
        out["probe"] = probes.PROBES[probe]
    if "memory" in totals:
        out["memory"] = totals["memory"]
    if "perplexity" in totals:
        out["perplexity"] = totals["perplexity"]
    return out
