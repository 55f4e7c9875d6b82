"""Static TensorRT-compatibility check of a bundle's ONNX files (`edge-vila check`).

Every node and tensor type is checked against the operator table of TensorRT's ONNX
parser for the target version, plus its explicit-quantization rules: Q/DQ scales and
zero points are constants, zero points are all zero (symmetric only), INT8/INT4/FP8 types
only (no UINT8/UINT4), no INT32 bias DequantizeLinear, no custom domains. INT4 and block
quantization arrived in TensorRT 10.0: JetPack 6.0 (TensorRT 8.6) cannot run an AWQ W4
bundle. The tables transcribe onnx-tensorrt's docs/operators.md; nothing here needs
TensorRT installed, and a passing check is not a substitute for building on the device.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# ops the parser handles in both 8.6 and 10.x (restrictions checked separately below)
_COMMON = set("""Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSigmoid HardSwish Hardmax Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization
LpPool LRN LSTM MatMul Max MaxPool Mean Min Mod Mul Multinomial Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan ScatterElements ScatterND
Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum
Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split())
_ADDED_10 = {"Gelu", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im", "DFT", "GroupNormalization",
             "AffineGrid", "BlackmanWindow", "HammingWindow", "HannWindow", "ReduceMin", "STFT"}
_TYPES_86 = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT32, TensorProto.INT64,
             TensorProto.BOOL, TensorProto.UINT8}
_TYPES_10 = _TYPES_86 | {TensorProto.BFLOAT16, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}

TRT_TARGETS: dict[str, dict] = {
    "8.6": {"ops": _COMMON, "types": _TYPES_86, "max_opset": 17, "int4": False, "block_dq": False,
            "jetpack": "6.0 (L4T 36.2/36.3)"},
    "10.3": {"ops": _COMMON | _ADDED_10, "types": _TYPES_10, "max_opset": 20, "int4": True, "block_dq": True,
             "jetpack": "6.1 / 6.2 (L4T 36.4)"},
}
JETPACK_TO_TRT = {"6.0": "8.6", "6.1": "10.3", "6.2": "10.3"}
QDQ_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}


def _const_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def check_model(model: onnx.ModelProto, target: str, name: str = "model") -> dict:
    if target not in TRT_TARGETS:
        raise ValueError(f"TensorRT {target!r} unknown (expected one of {', '.join(TRT_TARGETS)})")
    t = TRT_TARGETS[target]
    errors, warnings = [], []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > t["max_opset"]:
        msg = f"{name}: opset {opset} is above TensorRT {target}'s documented maximum ({t['max_opset']})"
        # block-quantized DequantizeLinear needs opset 21; TensorRT 10 parses it (unverified here)
        (warnings if t["block_dq"] else errors).append(msg)
    consts = _const_values(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    ops = Counter()
    for n in model.graph.node:
        ops[n.op_type] += 1
        where = f"{name}: node {n.name or n.op_type} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            errors.append(f"{where}: custom domain {n.domain!r} is not parsed by TensorRT")
            continue
        if n.op_type not in t["ops"]:
            errors.append(f"{where}: operator not supported by TensorRT {target}")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            errors += _check_qdq(n, where, consts, types, t, target)
    bad_types = {k: v for k, v in types.items() if v and v not in t["types"]}
    for k, v in list(bad_types.items())[:10]:
        errors.append(f"{name}: tensor {k} has type {TensorProto.DataType.Name(v)}, not a TensorRT {target} type")
    return {"ops": dict(ops), "errors": errors, "warnings": warnings, "opset": opset}


def _check_qdq(n, where, consts, types, t, target) -> list[str]:
    errs = []
    scale = n.input[1] if len(n.input) > 1 else None
    if scale not in consts:
        errs.append(f"{where}: scale must be a constant/initializer")
    if len(n.input) > 2 and n.input[2]:
        zp = consts.get(n.input[2])
        if zp is None:
            errs.append(f"{where}: zero point must be a constant/initializer")
        else:
            if zp.data_type not in QDQ_TYPES:
                errs.append(f"{where}: zero-point type {TensorProto.DataType.Name(zp.data_type)} (TensorRT takes "
                            "INT8/INT4/FP8 only; UINT8/UINT4 are rejected)")
            elif np.any(numpy_helper.to_array(zp) != 0):
                errs.append(f"{where}: non-zero zero point (TensorRT supports symmetric quantization only)")
    if n.op_type == "DequantizeLinear":
        x = consts.get(n.input[0])
        xt = x.data_type if x is not None else types.get(n.input[0])
        if xt == TensorProto.INT32:
            errs.append(f"{where}: INT32 (bias) DequantizeLinear is not supported; keep biases in float")
        if xt == TensorProto.INT4 and not t["int4"]:
            errs.append(f"{where}: INT4 weights need TensorRT >= 10.0; JetPack 6.0 ships {target}: "
                        "export with --llm-quant fp32 (or move to JetPack 6.1+)")
        if xt in (TensorProto.UINT8, TensorProto.UINT4):
            errs.append(f"{where}: unsigned quantized type (TensorRT takes INT8/INT4/FP8)")
    if any(a.name == "block_size" and a.i > 0 for a in n.attribute) and not t["block_dq"]:
        errs.append(f"{where}: block quantization needs TensorRT >= 10.0")
    return errs


def check_bundle(root: str | Path, target: str = "10.3") -> dict:
    root = Path(root)
    target = JETPACK_TO_TRT.get(target.removeprefix("jp"), target)
    res = {"target_trt": target, "jetpack": TRT_TARGETS[target]["jetpack"] if target in TRT_TARGETS else None,
           "files": {}}
    for f in ("vision.onnx", "projector.onnx", "llm.onnx"):  # projector.onnx: dynamic_s2 bundles
        if (root / f).is_file():
            res["files"][f] = check_model(onnx.load(str(root / f), load_external_data=False), target, f)
    res["ok"] = all(not r["errors"] for r in res["files"].values())
    return res
