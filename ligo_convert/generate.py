"""Greedy text generation from a causal LM with a key/value cache, on PyTorch or onnxruntime.

A quick look at what a (grown) model says: the prompt is encoded with the checkpoint's own ``tokenizer.json`` (or
bytes, as the data loaders do), the model runs the prompt once (the prefill) and then one token a step through its
cache, choosing the most likely token each time, until ``max_new_tokens`` or an end-of-sequence id of the model's
``generation_config.json`` / ``config.json``.  Both engines run the same loop; PyTorch through
:func:`ligo_convert.model.forward_cached`, onnxruntime through the exported cache graph (a graph exported without a
cache is run on the whole sequence every step), so they give the same tokens.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import options
from .canonical import CanonicalModel, load
from .data import TextEncoder
from .errors import LigoError
from .export import cache_names, has_cache, max_sequence
from .model import empty_cache, forward_cached, positions_of
from .spec import Spec

ENGINES = ("torch", "onnx")
# step(new ids (1, T), attention mask (1, past + T), position ids (1, T), state) -> (last logits (vocab,), state)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]


@dataclass
class Generation:
    engine: str
    prompt: str
    text: str  # the continuation only
    prompt_tokens: list[int]
    tokens: list[int]  # the new tokens
    stopped: str  # "max_new_tokens" or "eos"
    tokenizer: str
    seconds: float  # the decoding loop, prefill included

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def greedy(step: Step, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], str]:
    """The greedy loop both engines share: prefill, then one token a step; returns the new ids and why it stopped."""
    mask = torch.ones(1, len(prompt_ids), dtype=torch.int64)
    logits, state = step(torch.tensor([prompt_ids]), mask, positions_of(mask), None)
    out = []
    while True:
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            return out, "eos"
        if len(out) == max_new_tokens:
            return out, "max_new_tokens"
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
        logits, state = step(torch.tensor([[token]]), mask, positions_of(mask)[:, -1:], state)


def torch_step(spec: Spec, weights) -> Step:
    def step(ids, mask, positions, past):
        with torch.no_grad():
            logits, past = forward_cached(spec, weights, ids, mask, positions,
                                          past if past is not None else empty_cache(spec, 1), attention="sdpa")
        return logits[0, -1], past

    return step


def onnx_step(session, spec: Spec) -> Step:
    inputs = {i.name: i for i in session.get_inputs()}
    if "past_key_values.0.key" not in inputs:  # exported without a cache: the whole sequence every step
        def whole(ids, mask, positions, seen):
            seen = ids if seen is None else torch.cat([seen, ids], 1)
            feed = {"input_ids": seen.numpy(), "attention_mask": mask.numpy()}
            if "token_type_ids" in inputs:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            return torch.from_numpy(session.run(["logits"], feed)[0][0, -1]), seen

        return whole
    past_names, outputs = cache_names(spec, "past_key_values"), ["logits"] + cache_names(spec, "present")
    dtype = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32

    def step(ids, mask, positions, past):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
        if past is None:
            past = [np.zeros((1, spec.kv_heads, 0, spec.head_dim), dtype) for _ in past_names]
        feed.update(zip(past_names, past))
        got = session.run(outputs, feed)
        return torch.from_numpy(got[0][0, -1].astype(np.float32)), got[1:]

    return step


def eos_ids(folder: Path | None) -> set[int]:
    """The end-of-sequence ids of a checkpoint folder: generation_config.json's, else config.json's."""
    from .files import is_int, read_json_object

    if folder is None:
        return set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = read_json_object(path).get("eos_token_id")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(is_int(v) and v >= 0 for v in values):
            raise LigoError(f"{path}: eos_token_id must be a token id or a list of them, not {value!r}; fix the "
                            f"file")
        return set(values)
    return set()


def _folder(source) -> Path | None:
    if source is None or str(source) == "":
        return None
    path = Path(source)
    return path if path.is_dir() else None


def generate(model, prompt: str, max_new_tokens: int = 32, engine: str = "torch", *, family: str | None = None,
             stop_at_eos: bool = True, log: Callable[[str], None] | None = None) -> Generation:
    """Greedy continuation of ``prompt`` by a causal LM (a :class:`CanonicalModel`, anything :func:`load` takes, or
    with ``engine="onnx"`` an exported ``.onnx`` file, whose tokenizer is its source folder's)."""
    if engine not in ENGINES:
        raise LigoError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    options.check(max_new_tokens=(max_new_tokens, "size"))
    onnx_file = not isinstance(model, CanonicalModel) and str(model).endswith(".onnx")
    if onnx_file and engine != "onnx":
        raise LigoError(f"{model}: is an ONNX file; generate with --engine onnx, or pass the checkpoint folder")
    if onnx_file:
        from .export import read_metadata, spec_of_onnx

        if not Path(model).is_file():
            raise LigoError(f"{model}: no such ONNX file")
        canonical, spec, source = None, spec_of_onnx(model), read_metadata(model).get("source")
    else:
        canonical = model if isinstance(model, CanonicalModel) else load(model, family=family)
        spec, source = canonical.spec, canonical.source
    if not has_cache(spec):
        raise LigoError("generate needs a causal LM (GPT-2, LLaMA, Qwen, Gemma, Phi-3, OLMo 2, GPT-NeoX, OPT...); "
                        "this model has no causal LM head")
    folder = _folder(source)
    encoder = TextEncoder(spec, folder)
    prompt_ids = list(encoder.prefix) + encoder.encode(prompt).tolist()
    if not prompt_ids:
        raise LigoError("the prompt is empty and the tokenizer adds no start token: give a --prompt")
    limit = max_sequence(spec)
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise LigoError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new ones exceed the model's "
                        f"{limit} positions; pass --max-new-tokens {max(1, limit - len(prompt_ids))} or less")
    eos = eos_ids(folder) if stop_at_eos else set()
    with tempfile.TemporaryDirectory(prefix="ligo-generate-") as tmp:
        if engine == "onnx":
            from .export import _session, export_onnx, providers

            path = Path(model) if onnx_file else Path(tmp) / "model.onnx"
            if not onnx_file:  # export first, proven like any export
                report = export_onnx(canonical, path, log=log)
                if not report.ok:
                    raise LigoError(f"the ONNX export of this model failed validation: {report.failure()}")
            try:
                step = onnx_step(_session(path, providers()[-1]), spec)
            except Exception as e:  # a corrupt file or a missing external data file
                raise LigoError(f"{path}: onnxruntime cannot load it ({type(e).__name__}); export it again") \
                    from None
        else:
            step = torch_step(spec, canonical.materialize(torch.float32))
        start = time.perf_counter()
        tokens, stopped = greedy(step, prompt_ids, max_new_tokens, eos)
        seconds = time.perf_counter() - start
    text = encoder.decode([t for t in tokens if t not in eos])
    return Generation(engine, prompt, text, prompt_ids, tokens, stopped, encoder.name, seconds)
