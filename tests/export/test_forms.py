"""The gate forms of the exported graph: ``portable=True`` (ops every major runtime accelerates), the default form for
onnxruntime's CPU provider (its rewrite rules, exact against the graph they rewrite), and half precision.

References: onnxruntime sessions on the written files against the PyTorch model (parity, as in test_export.py),
the graph before a rewrite against the graph after it, and the published operator lists below.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import relu2dlgn
from relu2dlgn.export import export_onnx
from relu2dlgn.export.passes import onnxruntime_cpu_gates

from _models import TinyNet, build, input_size, rel_err
from test_export import FAST, SLOW, all_gates, check_parity, run

# Ops that both TensorRT's ONNX parser and onnxruntime's CUDA execution provider implement (so a portable graph
# runs there without CPU fallbacks), restricted to what relu2dlgn's exports use. Sources:
# * TensorRT: onnx/onnx-tensorrt, docs/operators.md ("Operator Support Matrix", TensorRT 8.4-10.x): every op
#   below is "Y"; MaxPool is listed as "2D or 3D pooling only. `Indices` output tensor unsupported", so MaxPool
#   is allowed here only without its Indices output (checked separately);
# * onnxruntime: docs/OperatorKernels.md, "Operators implemented by CUDAExecutionProvider": every op below has a
#   CUDA kernel at the opsets torch.onnx writes (18-20); ArgMax has one only up to opset 11, so it is not here.
# Deliberately absent: ArgMax / ArgMin, GatherElements / GatherND / ScatterElements (index ops), MaxPool's
# Indices output, HardSigmoid (the onnxruntime-CPU gate form).
PORTABLE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Sum", "Conv", "Gemm", "MatMul", "Relu", "LeakyRelu", "PRelu",
    "Clip", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "Not", "And", "Or", "Xor", "Where", "IsNaN",
    "Cast", "Constant", "Identity", "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand",
    "Concat", "Split", "Slice", "Gather", "Pad", "Tile", "Range", "AveragePool", "MaxPool", "GlobalAveragePool",
    "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "BatchNormalization",
    "Dropout",
})


def _source_adaptive_pool(node) -> bool:
    """torch.onnx lowers an upsampling adaptive average pooling of the *source* network (timm VGG's head on inputs
    under 224 px: 1x1 -> 7x7) to a GatherND; such a node is the source's own op, not a gate's."""
    meta = {p.key: p.value for p in node.metadata_props}
    return "adaptive_avg_pool2d" in meta.get("pkg.torch.onnx.stack_trace", "").splitlines()[-1]


def check_portable_ops(path) -> set[str]:
    """Every node of the file is in PORTABLE_OPS (a GatherND only where it is the source's own adaptive pooling),
    and no MaxPool has an Indices output. Returns the op types."""
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node if not (n.op_type == "GatherND" and _source_adaptive_pool(n))}
    assert ops <= PORTABLE_OPS, f"not portable: {sorted(ops - PORTABLE_OPS)}"
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            assert len(node.output) == 1 or not node.output[1], "MaxPool with Indices"
    return ops


# --------------------------------------------------------------------------------------------------
# portable
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,value_input,pool", [
    ("dlgn", "input", "gate"), ("dlgn", "ones", "gate"), ("dlgn", "input", "avg"), ("dgn", "input", "gate"),
])
def test_portable_every_gate_kind(tmp_path, mode, value_input, pool):
    x = torch.randn(2, 3, 17, 17)
    dlgn = relu2dlgn.convert(all_gates(), mode=mode, value_input=value_input, pool=pool, example_inputs=(x,))
    path = tmp_path / "m.onnx"
    report = export_onnx(dlgn, path, (x,), gates_output=True, portable=True)
    assert report.verification.ok and report.portable
    check_portable_ops(path)
    for batch in (3, 1):
        xb = torch.randn(batch, 3, 17, 17)
        res = run(path, xb)
        check_parity(dlgn, (xb,), res[:2], res[2:])


# Every model of the export tests; the large ones in DLGN mode only (a DGN's portable graph has the same gate ops,
# and test_export.py checks every model's DGN export): the suite must fit 2 cores.
ZOO = [pytest.param(s, m, id=f"{s}-{m}") for s in FAST for m in ("dlgn", "dgn")] + \
      [pytest.param(s, "dlgn", id=f"{s}-dlgn", marks=pytest.mark.slow) for s in SLOW]


@pytest.mark.parametrize("spec,mode", ZOO)
def test_portable_zoo_parity_and_op_set(tmp_path, spec, mode):
    size = input_size(spec)
    x = torch.randn(2, 3, size, size)
    dlgn = relu2dlgn.convert(build(spec), mode=mode, example_inputs=(x,))
    path = tmp_path / "m.onnx"
    report = export_onnx(dlgn, path, (x,), gates_output=True, portable=True)
    assert report.verification.ok
    ops = check_portable_ops(path)
    assert "GatherElements" not in ops and "ArgMax" not in ops
    xb = torch.randn(3, 3, size, size)
    res = run(path, xb)
    check_parity(dlgn, (xb,), res[:1], res[1:])


def test_portable_split_files(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    report = export_onnx(dlgn, tmp_path / "s.onnx", x, split=True, portable=True)
    assert report.verification.ok
    for f in report.paths:
        check_portable_ops(f)


def test_max_pool_gate_at_infinities_and_nan_in_onnx(tmp_path):
    """The max-pool gate of a DGN on a plane with ties, +-inf and NaN: the portable graph (the compare-and-select
    chain) gives PyTorch's indices and values exactly, NaN included; the default form exactly without NaN."""
    model = torch.nn.Sequential(torch.nn.MaxPool2d(3, 2, 1), torch.nn.Flatten()).eval()
    x = torch.randint(-2, 2, (2, 3, 9, 9)).float()
    x[x == -2], x[x == 1] = -math.inf, math.inf
    x[0, 0] = -math.inf  # a plane whose windows are all -inf
    dgn = relu2dlgn.convert(model, mode="dgn", example_inputs=(x,))
    ref_idx = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)[1].numpy()
    for portable in (True, False):
        path = tmp_path / f"m{portable}.onnx"
        export_onnx(dgn, path, (x,), gates_output=True, portable=portable, verify=False)
        out, idx = run(path, x)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(out, model(x).numpy())
    xn = x.clone()
    xn[1, 2, 4, 4] = math.nan
    out, idx = run(tmp_path / "mTrue.onnx", xn)
    ref_out, ref_idx = torch.nn.functional.max_pool2d(xn, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(out, ref_out.flatten(1).numpy())  # NaN == NaN for assert_array_equal


# --------------------------------------------------------------------------------------------------
# the onnxruntime-CPU gate form: rewrite rules, exact against the graph they rewrite
# --------------------------------------------------------------------------------------------------

def _gate_graph(extra: str):
    """q, v -> Where(Not(LessOrEqual(q, 0)), v, 0) [+ 'gate': the mask as an output, 'leaky': a second Where]."""
    from onnx import TensorProto, helper, numpy_helper

    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    slope = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "slope")
    nodes = [helper.make_node("LessOrEqual", ["q", "zero"], ["le"]), helper.make_node("Not", ["le"], ["g"]),
             helper.make_node("Where", ["g", "v", "zero"], ["h"])]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 16, 5, 4])]
    if extra == "gate":
        outputs.append(helper.make_tensor_value_info("g", TensorProto.BOOL, [None, 16, 5, 4]))
    if extra == "leaky":
        nodes += [helper.make_node("Mul", ["v", "slope"], ["va"]), helper.make_node("Where", ["g", "v", "va"], ["l"])]
        outputs.append(helper.make_tensor_value_info("l", TensorProto.FLOAT, [None, 16, 5, 4]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16, 5, 4]) for n in ("q", "v")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [zero, slope])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("extra", ["", "gate", "leaky"])
def test_onnxruntime_cpu_gate_rules_are_exact(extra):
    """The ReLU-family gate becomes Mul(v, HardSigmoid(Conv(q))) and every other Where arithmetic; the rewritten
    graph gives the original's outputs bit for bit on finite values, for q at every special float but NaN
    (signed zeros, the smallest subnormals, the largest finite values, infinities)."""
    from onnxscript import ir

    proto = onnx.shape_inference.infer_shapes(_gate_graph(extra))  # typed values, as torch.onnx writes them
    model = ir.serde.deserialize_model(proto)
    masks, selects = onnxruntime_cpu_gates(model)
    assert masks == 1 and selects == (1 if extra == "leaky" else 0)
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Where" not in ops and ops.count("HardSigmoid") == 1
    assert ("LessOrEqual" in ops) == (extra in ("gate", "leaky"))  # kept only where the mask is still used
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, -1.17e-38, 1.0, -1.0, 3.4e38, -3.4e38, np.inf, -np.inf],
                       dtype=np.float32)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 5, 4)).astype(np.float32)
    q.reshape(-1)[:special.size] = special
    v = rng.standard_normal((2, 16, 5, 4)).astype(np.float32)
    feeds = {"q": q, "v": v}
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after[0], np.where(q > 0, v, 0))


def test_onnxruntime_fuses_the_gate_mask_into_its_blocked_convolution(tmp_path):
    """What onnxruntime makes of the default form (its optimized-model dump): the gate masks are NCHWc
    convolutions with a fused HardSigmoid and no LessOrEqual / Not / Where is left. Skipped where onnxruntime uses
    no NCHWc layout (it needs x86 AVX2 or newer)."""
    x = torch.randn(2, 3, 32, 32)
    dlgn = relu2dlgn.convert(build("tv:resnet18"), example_inputs=(x,))
    path = tmp_path / "m.onnx"
    export_onnx(dlgn, path, (x,))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "opt.onnx").graph.node
    if not any(n.domain == "com.microsoft.nchwc" for n in nodes):
        pytest.skip("onnxruntime chose no NCHWc layout on this CPU")
    fused = [n for n in nodes if n.op_type == "Conv" and any(
        a.name == "activation" and a.s == b"HardSigmoid" for a in n.attribute)]
    assert len(fused) == sum(s.kind == "relu" for s in dlgn.sites)
    assert not {"LessOrEqual", "Not", "Where", "HardSigmoid"} & {n.op_type for n in nodes}


# --------------------------------------------------------------------------------------------------
# half precision
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("portable", [False, True])
def test_float16_export(tmp_path, portable):
    """dtype=torch.float16 writes a half-precision graph (float16 inputs, outputs and weights) that onnxruntime
    verifies against the PyTorch model in half precision with float16's tolerance; the model itself stays float32."""
    x = torch.randn(2, 3, 17, 17)
    dlgn = relu2dlgn.convert(all_gates(), example_inputs=(x,))
    path = tmp_path / "h.onnx"
    report = export_onnx(dlgn, path, (x,), dtype=torch.float16, gates_output=True, portable=portable)
    v = report.verification
    assert v.ok and report.dtype == "float16" and v.rtol == pytest.approx(10 * torch.finfo(torch.float16).eps)
    assert dlgn.dtype == torch.float32
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    xb = torch.randn(3, 3, 17, 17)
    res = run(path, xb.half())
    half = relu2dlgn.convert(all_gates(), example_inputs=(x,)).half().eval()
    with torch.no_grad():
        ref = half(xb.half())
    assert rel_err(torch.from_numpy(res[0]).float(), ref[0].float()) < 2e-2
    if portable:
        check_portable_ops(path)


def test_export_dtype_is_checked(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=(x,))
    with pytest.raises(relu2dlgn.OptionError, match=r"dtype must be one of float32, float16 .* got 'bfloat16'"):
        export_onnx(dlgn, tmp_path / "m.onnx", x, dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []
