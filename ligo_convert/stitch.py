"""A deep model's ONNX graph from one traced block per kind of layer, copied once per layer.

Tracing with torch.export and translating to ONNX cost time in proportion to the nodes traced, and a transformer is
one block repeated: tracing all of BERT-base traces the same block twelve times.  So the exporter traces three small
programs instead — the *start* (embeddings, and what every block reads: attention biases, rotary cos/sin), one
*block* per kind of layer (full attention, sliding window: :meth:`Spec.windowed`; the layers of a spec have the same
tensors) and the *finish* (final norm and heads) — and writes the model's graph by copying the block's nodes once per
layer, each copy reading its own layer's weights; a cache graph's copies read and write their layer's past and
present.  The copies hold the same ops as a single trace of the whole forward, and every file is validated against
PyTorch after it is written, as before.

The pieces are traced with ``optimize=False`` and tidied once, stitched (constant folding then makes each layer's
transposed weights from its own initializers).  Which axes of a piece's inputs are dynamic is found by running the
start in PyTorch at the export shape and at shapes one step larger along each input axis: an axis that follows one
input axis gets its name, one that follows several (past + new, patches of a resampled grid) is left to torch.export
(``Dim.AUTO``), the rest are static.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import KV, Context, block, finish, start, start_cached
from .spec import Spec


class Held(nn.Module):
    """Tensors held as frozen parameters under their canonical names, so the ONNX initializers carry those names."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(weights)
        for name, tensor in weights.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.get_parameter(name) for name in self.names}


# --- the three pieces --------------------------------------------------------------------------------------------


def flatten(ctx: Context) -> list[torch.Tensor]:
    """A context's tensors in field order (rotary pairs as two), Nones left out."""
    out = []
    for field in ctx:
        out += [] if field is None else list(field) if isinstance(field, tuple) else [field]
    return out


def unflatten(values: list, like: Context) -> Context:
    """The inverse of :func:`flatten`: ``values`` (tensors or graph values) in the fields ``like`` fills."""
    values, fields = list(values), []
    for field in like:
        count = 0 if field is None else len(field) if isinstance(field, tuple) else 1
        taken, values = values[:count], values[count:]
        fields.append(None if field is None else tuple(taken) if isinstance(field, tuple) else taken[0])
    return Context(*fields)


class Start(Held):
    """Embeddings and context: returns (x, *flatten(ctx))."""

    def __init__(self, spec: Spec, weights):
        super().__init__({k: v for k, v in weights.items() if not k.startswith("layers.")})
        self.spec = spec

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None):
        x, ctx = start(self.spec, self.weights(), input_ids, pixel_values, attention_mask, token_type_ids, "explicit")
        return (x, *flatten(ctx))


class StartCached(Start):
    """:class:`Start` of a step with a key/value cache."""

    def forward(self, input_ids, attention_mask, position_ids):
        x, ctx = start_cached(self.spec, self.weights(), input_ids, attention_mask, position_ids)
        return (x, *flatten(ctx))


class Block(Held):
    """Layer ``layer``: (x, bias?, cos?, sin?[, past key, past value]) -> x (, present key, present value)."""

    def __init__(self, spec: Spec, weights, layer: int, bias: bool, rope: bool, cache: bool):
        super().__init__({k: v for k, v in weights.items() if k.startswith(f"layers.{layer}.")})
        self.spec, self.layer, self.has_bias, self.has_rope, self.cache = spec, layer, bias, rope, cache

    def forward(self, x, *rest):
        rest = list(rest)
        bias = rest.pop(0) if self.has_bias else None
        rope = (rest.pop(0), rest.pop(0)) if self.has_rope else None
        kv = KV(*rest) if self.cache else None
        y = block(self.spec, self.weights(), self.layer, x, Context(bias, rope, bias, rope), "explicit", kv)
        return (y, kv.key, kv.value) if self.cache else y


class Finish(Held):
    """Final norm and heads: (x[, input_ids]) -> the outputs ``keys``."""

    def __init__(self, spec: Spec, weights, keys: list[str]):
        super().__init__({k: v for k, v in weights.items() if not k.startswith("layers.")})
        self.spec, self.keys = spec, keys

    def forward(self, x, input_ids=None):
        out = finish(self.spec, self.weights(), x, input_ids=input_ids)
        return tuple(out[k] for k in self.keys)


def block_inputs(spec: Spec, layer: int, x, ctx: Context) -> list:
    """What layer ``layer``'s block reads besides its cache: x, then its kind's bias and rotary cos/sin where the
    model has them (tensors, or the graph values that carry them)."""
    bias, rope = ctx.of(spec, layer)
    return [x] + ([bias] if bias is not None else []) + (list(rope) if rope is not None else [])


def _needs_ids(spec: Spec) -> bool:
    return spec.pool == "eos"


def kinds(spec: Spec) -> dict[bool, int]:
    """Kind of layer (windowed or not) -> the first layer of that kind, the one traced."""
    out: dict[bool, int] = {}
    for i in range(spec.layers):
        out.setdefault(spec.windowed(i), i)
    return out


# --- which axes of each piece's inputs are dynamic -----------------------------------------------------------------


def _settings(spec: Spec, cache: bool) -> tuple[dict[str, int], dict[str, int]]:
    """The export setting (axis -> size) and each axis's probing step."""
    from .export import CACHE_EXAMPLE, EXPORT_BATCH, EXPORT_SEQ, max_sequence

    if cache:
        new, past = CACHE_EXAMPLE
        return {"batch": EXPORT_BATCH, "sequence": new, "past_sequence": past}, \
            {"batch": 1, "sequence": 1, "past_sequence": 1}
    if spec.input == "patches":
        if spec.interpolate_positions:
            size, patch = spec.image_size, spec.patch_size
            return {"batch": EXPORT_BATCH, "height": size, "width": size}, \
                {"batch": 1, "height": patch, "width": patch}
        return {"batch": EXPORT_BATCH}, {"batch": 1}
    limit = max_sequence(spec)
    seq = EXPORT_SEQ if limit is None else min(EXPORT_SEQ, limit)
    return {"batch": EXPORT_BATCH, "sequence": seq}, {"batch": 1, "sequence": 1 if limit is None or seq < limit else -1}


def _start_inputs(spec: Spec, cache: bool, at: dict[str, int], dtype) -> tuple[tuple, dict, list[torch.Tensor]]:
    """(args, kwargs) of :class:`Start` at a setting, and for a cache graph every layer's (key, value) past."""
    from .export import cache_inputs, cache_names, example_inputs

    if cache:
        x = cache_inputs(spec, at["batch"], at["sequence"], at["past_sequence"], dtype=dtype)
        return (x["input_ids"], x["attention_mask"], x["position_ids"]), {}, \
            [x[n] for n in cache_names(spec, "past_key_values")]
    if spec.input == "patches" and spec.interpolate_positions:
        return (), example_inputs(spec, at["batch"], (at["height"], at["width"])), []
    return (), example_inputs(spec, at["batch"], at.get("sequence")), []


class Feeds:
    """Every piece's inputs, run in PyTorch at one setting of the input axes."""

    def __init__(self, spec: Spec, cache: bool, weights: dict[str, torch.Tensor], at: dict[str, int], dtype):
        self.args, self.kwargs, self.past = _start_inputs(spec, cache, at, dtype)
        with torch.no_grad():
            if cache:
                self.x, self.ctx = start_cached(spec, weights, *self.args)
            else:
                self.x, self.ctx = start(spec, weights, **self.kwargs, attention="explicit")
        self.ids = self.args[0] if cache else self.kwargs.get("input_ids")

    def block(self, spec: Spec, layer: int) -> list[torch.Tensor]:
        return block_inputs(spec, layer, self.x, self.ctx) + self.past[2 * layer:2 * layer + 2]

    def finish(self, spec: Spec) -> list[torch.Tensor]:
        return [self.x] + ([self.ids] if _needs_ids(spec) else [])


def dynamic_axes(base: list[torch.Tensor], moved: dict[str, list[torch.Tensor]], at: dict[str, int],
                 dims: dict[str, object]) -> tuple[dict[int, object], ...]:
    """Per tensor, its dynamic axes: the named Dim of the one input axis it follows at that axis's size, Dim.AUTO
    for one that follows several or another size, nothing for a static one."""
    out = []
    for j, tensor in enumerate(base):
        spec_j = {}
        for d, size in enumerate(tensor.shape):
            follows = [axis for axis, ts in moved.items() if ts[j].shape[d] != size]
            if len(follows) == 1 and size == at[follows[0]] and follows[0] in dims:
                spec_j[d] = dims[follows[0]]
            elif follows:
                spec_j[d] = torch.export.Dim.AUTO
        out.append(spec_j)
    return tuple(out)


# --- tracing the pieces and stitching them ---------------------------------------------------------------------------


def _export(module: nn.Module, args, kwargs, dynamic, names_in: list[str], names_out: list[str], opset: int):
    import onnx_ir.passes.common as common

    program = torch.onnx.export(module, tuple(args), kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                input_names=names_in, output_names=names_out, dynamic_shapes=dynamic,
                                verbose=False, optimize=False)
    common.InlinePass()(program.model)
    return program.model


def trace_stitched(spec: Spec, weights: dict[str, torch.Tensor], opset: int, cache: bool = False):
    """The whole model's ``onnx_ir`` model from traces of its start, one block per kind of layer and its finish
    (untidied; the caller tidies it as it would a single trace)."""
    from .export import cache_names, input_names, max_sequence, output_keys, output_names, trace_inputs

    dtype = next(iter(weights.values())).dtype
    at, steps = _settings(spec, cache)
    base = Feeds(spec, cache, weights, at, dtype)
    moved = {axis: Feeds(spec, cache, weights, {**at, axis: at[axis] + step}, dtype) for axis, step in steps.items()}
    dims = {"batch": torch.export.Dim("batch"), "past_sequence": torch.export.Dim("past_sequence"),
            # as the single trace: a position table bounds the sequence of a plain graph
            "sequence": torch.export.Dim("sequence") if cache else
            torch.export.Dim("sequence", max=max_sequence(spec) or 2**20)}

    args, kwargs, dynamic = trace_inputs(spec, cache, dtype)
    graph_inputs = input_names(spec, cache)
    if cache:  # the start reads no past
        args, dynamic, graph_inputs = args[:3], dynamic[:3], graph_inputs[:3]
    start_names = ["x"] + [f"context.{j}" for j in range(len(flatten(base.ctx)))]
    model = _export((StartCached if cache else Start)(spec, weights), args, kwargs, dynamic, graph_inputs,
                    start_names, opset)

    blocks = {}
    for kind, layer in kinds(spec).items():
        bias, rope = base.ctx.of(spec, layer)
        feeds = base.block(spec, layer)
        axes = dynamic_axes(feeds, {a: f.block(spec, layer) for a, f in moved.items()}, at, dims)
        names_in = ["x"] + [f"context.{j}" for j in range(len(feeds) - 1 - 2 * cache)] + \
            ["past.key", "past.value"][:2 * cache]
        names_out = ["y", "present.key", "present.value"][:1 + 2 * cache]
        module = Block(spec, weights, layer, bias is not None, rope is not None, cache)
        # Block.forward(x, *rest): dynamic shapes follow that structure
        structure = (axes[0], axes[1:]) if axes[1:] else axes
        blocks[kind] = (_export(module, feeds, {}, structure, names_in, names_out, opset), layer)

    feeds = base.finish(spec)
    axes = dynamic_axes(feeds, {a: f.finish(spec) for a, f in moved.items()}, at, dims)
    keys = ["logits"] if cache else output_keys(spec)
    head = _export(Finish(spec, weights, keys), feeds, {}, axes, ["x", "input_ids"][:len(feeds)],
                   output_names(spec, cache)[:len(keys)], opset)
    past = cache_names(spec, "past_key_values") if cache else []
    return stitch(model, blocks, head, spec, weights, base.ctx, past, output_names(spec, cache))


def _initializer(graph, name: str, old, weights: dict[str, torch.Tensor]):
    """The graph's initializer ``name``: already there (a tied table the start and the finish both read), or made
    from ``weights`` (a layer's own tensor) or from the piece's constant ``old``."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    if name in graph.initializers:
        return graph.initializers[name]
    value = TorchTensor(weights[name], name=name) if name in weights else old.const_value
    out = ir.Value(name=name, shape=old.shape, type=old.type, const_value=value)
    graph.register_initializer(out)
    return out


def copy_into(graph, piece, feeds: list, prefix: str, rename, weights: dict[str, torch.Tensor]) -> list:
    """Append ``piece``'s nodes to ``graph``, its inputs read from ``feeds``; initializer names go through
    ``rename`` (parameters: this layer's names) or get ``prefix`` (constants).  Returns the copies of its outputs."""
    import onnx_ir as ir

    mapping = dict(zip(piece.graph.inputs, feeds))
    for name, old in piece.graph.initializers.items():
        target = rename(name)  # a parameter: this layer's tensor; a constant of the piece: a name of this copy
        mapping[old] = _initializer(graph, target if target in weights else prefix + name, old, weights)
    for node in piece.graph:
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise NotImplementedError("a piece with a subgraph")  # not made by the canonical forward
        copy = ir.Node(node.domain, node.op_type, [None if v is None else mapping[v] for v in node.inputs],
                       [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()], overload=node.overload,
                       num_outputs=len(node.outputs), version=node.version, name=prefix + (node.name or ""))
        for old, new in zip(node.outputs, copy.outputs):
            new.name, new.type, mapping[old] = prefix + old.name, old.type, new
        graph.append(copy)
    return [mapping[v] for v in piece.graph.outputs]


def stitch(model, blocks: dict, head, spec: Spec, weights, like: Context, past: list[str], outputs: list[str]):
    """``model`` (the start, traced) grown in place into the whole graph: a copy of its layer's block for every
    layer, then the head.  ``past``: the cache inputs' names; ``outputs``: the graph's output names."""
    import onnx_ir as ir

    graph = model.graph
    for piece in [head] + [b for b, _ in blocks.values()]:
        model.opset_imports.update(piece.opset_imports)
    x, *context = graph.outputs
    ctx = unflatten(context, like)
    graph.outputs.clear()
    presents = []
    for layer in range(spec.layers):
        piece, traced = blocks[spec.windowed(layer)]
        feeds = block_inputs(spec, layer, x, ctx)
        for name, proto in zip(past[2 * layer:2 * layer + 2], piece.graph.inputs[len(feeds):]):
            value = ir.Value(name=name, shape=proto.shape, type=proto.type)
            graph.inputs.append(value)
            feeds.append(value)
        old, new = f"layers.{traced}.", f"layers.{layer}."
        x, *kv = copy_into(graph, piece, feeds, new,
                           lambda n: new + n[len(old):] if n.startswith(old) else n, weights)
        presents += kv
    ids = [v for v in graph.inputs if v.name == "input_ids"]
    results = copy_into(graph, head, [x] + ids[:len(head.graph.inputs) - 1], "head.", lambda n: n, weights)
    shapes = [v.shape for v in head.graph.outputs]
    for layer in range(spec.layers if past else 0):
        shapes += [v.shape for v in blocks[spec.windowed(layer)][0].graph.outputs[1:]]
    for value, name, shape in zip(results + presents, outputs, shapes):
        if value.is_graph_input() or value.is_graph_output():  # an output that is the head's input as it is
            value = ir.Node("", "Identity", [value], num_outputs=1).outputs[0]
            graph.append(value.producer())
        value.name, value.shape = name, shape
        graph.outputs.append(value)
    return model
