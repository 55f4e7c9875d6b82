"""The Jetson layer's CPU-testable logic: detection parsers, tegrastats, power integration,
memory budgets (hand-computed for VILA1.5-3B), engine keys and TensorRT profiles, setup.sh."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edge_vila.bundle import read_manifest
from edge_vila.jetson import detect as D
from edge_vila.jetson import engines as E
from edge_vila.jetson import memory as M
from edge_vila.jetson.stats import integrate_energy, mean_power, parse_nvpmodel_query
from edge_vila.jetson.tegrastats import parse_line

ROOT = Path(__file__).resolve().parents[1]
LINES = [l for l in (Path(__file__).parent / "data" / "tegrastats.txt").read_text().splitlines()
         if l and not l.startswith("#")]


@pytest.mark.parametrize("text,l4t,jp,trt", [
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13", "36.4.0",
     "6.1", "10.3"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", "36.4.3", "6.2", "10.3"),
    ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64", "36.3.0", "6.0", "8.6"),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2", "8.5"),
])
def test_l4t_to_jetpack(text, l4t, jp, trt):
    assert D.parse_nv_tegra_release(text) == l4t
    assert D.jetpack_for_l4t(l4t) == jp
    assert D.JETPACK_TO_TENSORRT[jp] == trt


def test_dpkg_and_precisions():
    pkgs = D.parse_dpkg("nvidia-jetpack 6.1+b123\ntensorrt 10.3.0.30-1+cuda12.5\nlibnvinfer10 10.3.0.30-1+cuda12.5\n")
    assert D.jetpack_from_dpkg(pkgs) == "6.1" and D.tensorrt_from_dpkg(pkgs) == "10.3"
    assert D.tensorrt_from_dpkg(D.parse_dpkg("libnvinfer8 8.6.2.3-1+cuda12.2")) == "8.6"
    assert D.precisions_for_tensorrt("10.3").int4_weights and not D.precisions_for_tensorrt("8.6").int4_weights
    assert not D.precisions_for_tensorrt("10.3").fp8  # Orin has no FP8


@pytest.mark.parametrize("model,ram,board", [
    ("NVIDIA Jetson Orin Nano Developer Kit", 7.4, "orin-nano-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15.3, "orin-nx-16gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 61.3, "agx-orin-64gb"),
    ("NVIDIA Jetson AGX Orin", 30.6, "agx-orin-32gb"),
    ("Raspberry Pi 5 Model B", 8.0, None),
])
def test_board_from_model(model, ram, board):
    assert D.board_from_model(model, ram) == board


def test_detect_reads_files_under_a_root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    info = D.detect(str(tmp_path))
    assert info.is_jetson and info.l4t == "36.4.3" and info.jetpack == "6.2" and info.sm == "sm87"
    assert info.board.startswith("orin-nano")
    assert not D.detect(str(tmp_path / "nothing")).is_jetson


def test_tegrastats_lines():
    nano, nx, agx, old = (parse_line(l) for l in LINES)
    assert (nano.ram_used_mb, nano.ram_total_mb) == (1816, 7620)
    assert nano.cpu_load[:2] == [1.0, 0.0] and nano.cpu_load[4] is None and nano.cpu_mhz[0] == 1510
    assert nano.gpu_load == 0 and nano.gpu_mhz == 305
    assert nano.temps_c["tj"] == pytest.approx(47.718) and nano.rails_mw["VDD_SOC"] == (1432, 1432)
    assert nano.power_w == pytest.approx(4.987)
    assert nx.gpu_load == 97 and nx.emc_load == 38 and nx.power_w == pytest.approx(17.456)
    assert "cv0" not in nx.temps_c and nx.temps_c["gpu"] == 61.5  # -256 C = sensor absent
    assert agx.gpu_mhz == 1300 and agx.power_w == pytest.approx(5.818)  # VIN_SYS_5V0 is AGX's input rail
    assert len(agx.cpu_load) == 12 and agx.rails_mw["VDD_GPU_SOC"] == (12206, 11840)
    assert old.power_w == pytest.approx(2.0) and old.gpu_load == 12 and old.temps_c["thermal"] == 42.75
    assert "RAM" not in nano.rails_mw and "SWAP" not in nano.rails_mw
    assert parse_line("garbage").power_w is None


def test_energy_integration_and_nvpmodel():
    flat = [(t * 0.1, 10.0) for t in range(21)]  # 10 W for 2 s
    assert integrate_energy(flat) == pytest.approx(20.0) and mean_power(flat) == pytest.approx(10.0)
    ramp = [(0.0, 0.0), (1.0, 4.0), (3.0, 4.0)]
    assert integrate_energy(ramp) == pytest.approx(2.0 + 8.0)
    assert integrate_energy([(0.0, 5.0)]) is None
    assert parse_nvpmodel_query("NV Power Mode: MAXN\n0\n") == ("MAXN", 0)
    assert parse_nvpmodel_query("NV Power Mode: 15W\n1") == ("15W", 1)


def test_memory_budget_vila15_3b_by_hand():
    d = M.ModelDims.vila15_3b()
    lin = 32 * (2560 * 2560 * 4 + 3 * 2560 * 6912)  # q,k,v,o (MHA: 20 heads x 128) + gate/up/down
    assert d.llm_linear_params() == lin == 2_537_553_920
    o = M.BudgetOptions(max_context=4096)
    p = M.parts(d, o)
    assert p["llm_weights"] == lin // 2 + 4 * (lin // 128) + 2 * 32 * 2560 * 2
    assert p["lm_head"] == 32000 * 2560 * 2 and p["embed_table_host"] == 32000 * 2560 * 2
    # K and V, 32 layers x 20 heads x 128, fp16, two ping-pong buffers, 4096 positions = 2.5 GiB
    assert p["kv_cache"] == 2 * 32 * 20 * 128 * 2 * 2 * 4096 == 2.5 * M.GiB
    assert M.kv_cache_bytes(d, M.BudgetOptions(max_context=4096, kv_bytes=2, kv_buffers=1)) == 1.25 * M.GiB
    assert M.available_bytes("orin-nano-8gb", o) == int((8 * 0.95 - 1.2 - 0.6) * M.GiB)
    assert M.budget(d, "agx-orin-32gb", o).fits and M.budget(d, "orin-nano-8gb", o).fits
    fp32_kv = M.BudgetOptions(max_context=4096, kv_bytes=4)  # a bundle exported with --kv-dtype fp32
    small = M.budget(d, "orin-nano-8gb", fp32_kv)
    assert not small.fits and "--max-context" in small.suggestion
    ctx = int(small.suggestion.split("--max-context ")[1].split()[0])
    assert M.budget(d, "orin-nano-8gb", M.BudgetOptions(max_context=ctx, kv_bytes=4)).fits
    assert not M.budget(d, "orin-nano-8gb", M.BudgetOptions(max_context=ctx + 256, kv_bytes=4)).fits
    tiny_board = M.budget(d, "orin-nano-4gb", o)
    assert "does not fit orin-nano-4gb at any context" in tiny_board.suggestion
    with pytest.raises(ValueError, match="board 'orin-mega'"):
        M.budget(d, "orin-mega")


def test_budget_of_released_layouts_from_their_configs():
    assert M.ModelDims.from_layout("VILA1.5-3b") == M.ModelDims.vila15_3b()
    d = M.ModelDims.from_layout("Llama-3-VILA1.5-8B")  # GQA: 8 KV heads of 128
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.vocab) == (4096, 32, 32, 8, 128, 128256)
    # q 4096x4096, k/v 4096x1024 each, o 4096x4096, MLP 3 x 4096x14336, per layer
    assert d.llm_linear_params() == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert M.kv_cache_bytes(d, M.BudgetOptions(max_context=4096)) == 2 * 32 * 8 * 128 * 2 * 2 * 4096
    d = M.ModelDims.from_layout("NVILA-8B")  # dynamic_s2: 1 + 4 + 12 tiles in, 12 blocks x 256 + "\n" out
    assert (d.tokens_per_image, d.inputs_per_image, d.positions_per_image) == (256, 17, 12 * 256 + 1)
    assert (d.projector_in, d.projector_mid) == (4 * 3456, 0)
    with pytest.raises(ValueError, match="unknown"):
        M.ModelDims.from_layout("VILA9-1b")


def test_budget_from_bundle_manifest(tiny_bundle):
    man = read_manifest(tiny_bundle, verify=False)
    d = M.ModelDims.from_manifest(man)
    assert d.hidden == 128 and d.vision_layers > 0 and d.tokens_per_image == man.tokens_per_image
    b = M.budget(d, "orin-nano-8gb", M.BudgetOptions(max_context=512))
    assert b.fits and b.parts["vision_weights"] > 0
    # what the bundle stores: fp16 KV I/O; the tiny checkpoint is float32, so its table stays fp32
    assert M.bundle_byte_widths(tiny_bundle, man) == {"kv_bytes": 2, "embed_bytes": 4}
    old = dataclasses.replace(man, io={})  # a manifest from before kv_dtype
    assert M.bundle_byte_widths(tiny_bundle, old)["kv_bytes"] == 4


def _key(man, **kw):
    base = dict(tensorrt="10.3.0", sm="sm87", jetpack="6.1",
                onnx_sha256={k: v for k, v in man.files.items() if k.endswith(".onnx")})
    return E.EngineKey(**{**base, **kw})


def test_engine_keys_refuse_mismatches(tiny_bundle, tmp_path):
    man = read_manifest(tiny_bundle, verify=False)
    here = _key(man)
    assert here.dirname() == "trt10.3.0-sm87-jp6.1"
    with pytest.raises(E.EngineMismatch, match="no engines for this device; build them"):
        E.select_engines(tmp_path, here)
    folder = E.engine_dir(tmp_path, here)
    folder.mkdir(parents=True)
    with pytest.raises(E.EngineMismatch, match="engine_key.json: missing"):
        E.check_engines(folder, here)
    E.write_key(folder, here)
    with pytest.raises(E.EngineMismatch, match="llm.plan: missing"):
        E.check_engines(folder, here)
    for plan in (E.LLM_PLAN, E.VISION_PLAN):
        (folder / plan).write_bytes(b"plan")
    with pytest.raises(E.EngineMismatch, match="no sha256 recorded for llm.plan"):  # key written before the plans
        E.check_engines(folder, here)
    E.write_key(folder, here)  # the build writes it last, with each plan's sha256
    assert E.select_engines(tmp_path, here)[0] == folder
    (folder / E.VISION_PLAN).write_bytes(b"plaN")  # overwritten since the build: never deserialized
    with pytest.raises(E.EngineMismatch, match="vision.plan: changed or missing since it was built"):
        E.select_engines(tmp_path, here)
    E.write_key(folder, here)
    # the same folder name cannot hide a different ONNX
    changed = _key(man, onnx_sha256={**here.onnx_sha256, "llm.onnx": "0" * 64})
    with pytest.raises(E.EngineMismatch, match="llm.onnx changed since the engines were built.*--rebuild"):
        E.check_engines(folder, changed)
    # another TensorRT version: its folder does not exist; the error names what does
    with pytest.raises(E.EngineMismatch, match=r"found engines for trt10.3.0-sm87-jp6.1"):
        E.select_engines(tmp_path, _key(man, tensorrt="10.7.0"))
    probs = E.compatibility_problems(here, _key(man, tensorrt="8.6.2", sm="sm72", jetpack="6.0"))
    assert len(probs) == 3 and "TensorRT 10.3.0" in probs[0] and "sm72" in probs[1]


def test_llm_profiles_cover_the_onnx_inputs(tiny_bundle):
    man = read_manifest(tiny_bundle, verify=False)
    model = onnx.load(str(tiny_bundle / "llm.onnx"), load_external_data=False)
    prefill, decode = E.llm_profiles(man, max_context=512, max_prefill=256)
    graph_inputs = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    for prof in (prefill, decode):
        assert set(prof.shapes) == set(graph_inputs)
        for name, shapes in prof.shapes.items():
            for shape in shapes:  # static dims in the ONNX must agree with every profile shape
                assert len(shape) == len(graph_inputs[name])
                assert all(g is None or g == s for g, s in zip(graph_inputs[name], shape)), (name, shape)
    assert prefill.shapes["inputs_embeds"][2] == (1, 256, 128) and prefill.shapes["past_key.0"][0][2] == 0
    assert decode.shapes["inputs_embeds"] == ((1, 1, 128),) * 3 and decode.shapes["past_key.0"][2][2] == 511
    with pytest.raises(ValueError, match="exceeds the bundle's exported 512"):
        E.llm_profiles(man, max_context=1024, max_prefill=16)
    vis = E.vision_profile(man, max_images=4)
    pre = man.preprocess
    assert vis.shapes["pixels"] == ((1, 3, pre["height"], pre["width"]), (1, 3, pre["height"], pre["width"]),
                                    (4, 3, pre["height"], pre["width"]))


def test_builder_flags_and_key(tiny_bundle):
    from edge_vila.errors import InputError
    from edge_vila.export.trt_build import BuildOptions, builder_flags, plan_key

    man = read_manifest(tiny_bundle, verify=False)
    assert builder_flags("auto", man, "10.3.0") == ["FP16", "INT8"]
    assert builder_flags("fp16", man, "10.3.0") == ["FP16"] and builder_flags("fp32", man, "10.3.0") == []
    with pytest.raises(InputError, match="TensorRT 8.6.2 cannot build.*--llm-quant fp16"):
        builder_flags("auto", man, "8.6.2")
    k = plan_key(tiny_bundle, man, "10.3.0", "sm87", "6.1", BuildOptions(max_context=256))
    assert k.max_context == 256 and k.max_prefill == 256 and set(k.onnx_sha256) == {"llm.onnx", "llm.onnx.data", "vision.onnx"}


def test_tensorrt_backend_says_why_it_cannot_load(tiny_bundle):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is importable here: the gpu tests cover the backend")
    except ImportError:
        pass
    import edge_vila
    from edge_vila.errors import InputError

    with pytest.raises(InputError, match="TensorRT is not importable"):
        edge_vila.load(tiny_bundle, backend="tensorrt")
    assert edge_vila.load(tiny_bundle).backend.name == "onnxruntime"  # auto falls back


def test_setup_sh_dry_run():
    r = subprocess.run(["bash", str(ROOT / "jetson/setup.sh"), "--dry-run", "--ort-wheel", "ort.whl"],
                       capture_output=True, text=True, env={**os.environ, "USER": "robot"})
    assert r.returncode == 0, r.stderr
    cmds = [l[2:] for l in r.stdout.splitlines() if l.startswith("+ ")]
    assert any("python3 -m venv --system-site-packages" in c for c in cmds)
    assert any("python3-libnvinfer" in c for c in cmds) and any("jetson-stats" in c for c in cmds)
    assert any(c.endswith("install ort.whl") for c in cmds) and any("usermod -aG video,render robot" in c for c in cmds)
    if not Path("/etc/nv_tegra_release").exists():
        r = subprocess.run(["bash", str(ROOT / "jetson/setup.sh")], capture_output=True, text=True)
        assert r.returncode == 1 and "not found: this script sets up a Jetson" in r.stderr


def test_budget_cli():
    exe = [sys.executable, "-m", "edge_vila"]
    r = subprocess.run([*exe, "budget", "--model", "Llama-3-VILA1.5-8B", "--board", "orin-nano-8gb"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout and "try orin-nx-16gb" in r.stdout
    r = subprocess.run([*exe, "budget", "--model", "vila1.5-3b", "--board", "orin-nano-8gb", "--max-context", "8192"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout and "--max-context" in r.stdout
    r = subprocess.run([*exe, "budget", "--model", "VILA9-1b"], capture_output=True, text=True)
    assert r.returncode == 2 and "VILA9-1b" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*exe, "budget", "--model", "vila1.5-3b", "--board", "agx-orin-64gb", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["fits"]
