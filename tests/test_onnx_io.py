"""The one-file ONNX writer: the file it writes is the model onnx_ir.save writes (same nodes, the same initializers
byte for byte, the same outputs in onnxruntime), and the model in memory is left as it was."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ligo_convert import export as ex
from ligo_convert import onnx_io
from ligo_convert.growth.pretrain import micro_spec
from ligo_convert.model import init_weights


def traced_gpt2():
    # a vocabulary of 600 x 32: the one table past APPEND_FROM_BYTES (76.8 kB)
    spec = micro_spec("hf-gpt2", layers=2, width=32, heads=4, mlp=64, vocab_size=600)
    return spec, ex.trace(spec, init_weights(spec, seed=0), ex.DEFAULT_OPSET)


def without_initializers_and_their_types(proto: onnx.ModelProto) -> bytes:
    """The model less its initializers and the value_info entries onnx_ir adds for them (types their tensors
    already carry)."""
    rest = onnx.ModelProto()
    rest.CopyFrom(proto)
    names = {t.name for t in rest.graph.initializer}
    del rest.graph.initializer[:]
    kept = [v for v in rest.graph.value_info if v.name not in names]
    del rest.graph.value_info[:]
    rest.graph.value_info.extend(kept)
    return rest.SerializeToString()


@pytest.mark.parametrize("append_from", [onnx_io.APPEND_FROM_BYTES, 0])
def test_the_file_holds_the_model_onnx_ir_writes(tmp_path, monkeypatch, append_from):
    monkeypatch.setattr(onnx_io, "APPEND_FROM_BYTES", append_from)  # 0: every initializer appended
    spec, model = traced_gpt2()
    order = list(model.graph.initializers)
    ir.save(model, tmp_path / "reference.onnx")
    onnx_io.save_one_file(model, tmp_path / "fast.onnx")
    assert list(model.graph.initializers) == order  # the model in memory is unchanged
    assert all(v.graph is model.graph for v in model.graph.initializers.values())

    ref, fast = onnx.load(tmp_path / "reference.onnx"), onnx.load(tmp_path / "fast.onnx")
    onnx.checker.check_model(fast)
    ref_tensors = {t.name: t.SerializeToString() for t in ref.graph.initializer}
    fast_tensors = {t.name: t.SerializeToString() for t in fast.graph.initializer}
    assert fast_tensors == ref_tensors
    appended = [n for n in order if model.graph.initializers[n].const_value.nbytes >= append_from]
    assert appended and [t.name for t in fast.graph.initializer][-len(appended):] == appended
    assert without_initializers_and_their_types(fast) == without_initializers_and_their_types(ref)

    ids = np.array([[5, 7, 11, 3, 2]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feed)
            for f in ("reference.onnx", "fast.onnx")]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_varints_as_protobuf_writes_them():
    from google.protobuf.internal import encoder

    for n in (0, 1, 127, 128, 300, 2**21, 2**31 - 1, 2**35 + 5):
        assert onnx_io._varint(n) == encoder._VarintBytes(n)


def test_an_export_writes_one_file_that_matches_pytorch(tmp_path):
    from ligo_convert import from_tensors, save

    spec = micro_spec("hf-gpt2", layers=2, width=32, heads=4, mlp=64, vocab_size=600)
    save(from_tensors(spec, init_weights(spec, seed=1), "hf-gpt2"), tmp_path / "m")
    report = ex.export_onnx(tmp_path / "m", tmp_path / "m.onnx")  # validated against PyTorch, generation included
    assert report.ok and report.external_data is None and report.kv_cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.onnx"]
    # the token table went through the appended path: it comes after every small initializer
    names = [t.name for t in onnx.load(tmp_path / "m.onnx").graph.initializer]
    assert names[-1] == "embed.tokens" and names.count("embed.tokens") == 1
