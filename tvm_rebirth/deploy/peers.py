"""The engines a user would pick instead of ours, on the same model: ONNX Runtime, ncnn and
MNN next to tvm-rebirth's builds.

* On this CPU (``time_engines``): every engine in its own process (``peer_engine.py serve``),
  so no other engine's thread pool spins beside the one being timed; rounds still alternate
  engines, with a pause between turns.
* On the emulated Cortex-A72 (``count_on_emulated_device``): guest aarch64 instructions per
  inference, 1 thread, counted by the project's QEMU plugin between the lseek markers of
  ``peer_engine.py count``. The engines' aarch64 wheels are unpacked once into a ``peers/``
  site next to the device's sysroot (with a ready marker); the models are converted once per
  source model into the cache (ncnn with the x86 ``pnnx``, MNN with ``mnnconvert``), all cut
  before the final Softmax so logits (not saturated probabilities) are compared with ONNX
  Runtime on the host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import RebirthError

logger = logging.getLogger(__name__)

ENGINE_SCRIPT = Path(__file__).with_name("peer_engine.py")
# the engines' aarch64 wheels the emulated device runs (cp311, like its Python)
GUEST_PEER_WHEELS = {"onnxruntime": "onnxruntime==1.32.0", "ncnn": "ncnn==1.0.20261020",
                     "mnn": "MNN==3.6.1"}
PEER_ENGINES = tuple(GUEST_PEER_WHEELS)
# x86 converters, by command (setup.py extra "peers")
CONVERTERS = {"pnnx": "pnnx==20261020", "mnnconvert": "MNN==3.6.1"}
# /proc/cpuinfo of a Cortex-A72 (ORT's cpuinfo parses it; the x86 host's makes it segfault)
_A72_CPUINFO = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 "
                "cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
                "CPU part\t: 0xd08\nCPU revision\t: 3\n\n")


def _last_line(text: str, default: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else default)[:300]


# --------------------------------------------------------------------------- models

def onnx_cache_dir(model) -> Path:
    from ..frontend.zoo import cache_dir

    return cache_dir() / "peers" / f"{model.name}-{model.sha256[:12]}"


def _atomic_save(onnx_model, path: Path) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    onnx.save(onnx_model, str(tmp))
    os.replace(tmp, path)


def cut_before_softmax(onnx_model):
    """A copy whose outputs are the inputs of the Softmax nodes that produced them (the
    logits); a model without a final Softmax is returned as a copy."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    producers = {o: n for n in m.graph.node for o in n.output}
    outputs = []
    for out in m.graph.output:
        node = producers.get(out.name)
        if node is not None and node.op_type == "Softmax":
            m.graph.node.remove(node)
            outputs.append(helper.make_tensor_value_info(node.input[0], out.type.tensor_type
                                                         .elem_type, None))
        else:
            outputs.append(out)
    del m.graph.output[:]
    m.graph.output.extend(outputs)
    return onnx.shape_inference.infer_shapes(m)


def global_pools(onnx_model):
    """A copy with every AveragePool that averages its whole (unpadded) input map -- output
    1x1, window covering the input, padding excluded from the count, e.g. GoogLeNet's pool5,
    7x7 with end padding on a 6x6 map -- written as the GlobalAveragePool it is (pnnx
    mis-converts the padded form)."""
    import onnx
    from onnx import helper

    m = onnx.shape_inference.infer_shapes(onnx_model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    for i, node in enumerate(list(m.graph.node)):
        if node.op_type != "AveragePool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape_in, shape_out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not shape_in or not shape_out or len(shape_in) != 4 or shape_out[2:] != [1, 1]:
            continue
        kernel = list(attrs.get("kernel_shape", []))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if (attrs.get("count_include_pad", 0) or attrs.get("ceil_mode", 0)
                or len(kernel) != 2 or kernel[0] < shape_in[2] or kernel[1] < shape_in[3]
                or pads[0] or pads[1] or kernel[0] > shape_in[2] + pads[2]
                or kernel[1] > shape_in[3] + pads[3]):
            continue
        m.graph.node.remove(node)
        m.graph.node.insert(i, helper.make_node("GlobalAveragePool", [node.input[0]],
                                                [node.output[0]], name=node.name))
    return m


def prepare_models(model, engines=PEER_ENGINES) -> dict:
    """{what: path} in the cache, made once per source model: ``logits`` (the model cut
    before its Softmax: ONNX Runtime's reference), ``onnxruntime`` (that, global pools made
    explicit), ``ncnn`` (.ncnn.param, fp32 weights) and ``mnn`` (.mnn) of the same graph."""
    folder = onnx_cache_dir(model)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"logits": folder / "logits.onnx", "onnxruntime": folder / "engine.onnx",
             "ncnn": folder / "engine.ncnn.param", "mnn": folder / "engine.mnn"}
    if not paths["logits"].exists() or not paths["onnxruntime"].exists():
        logits = cut_before_softmax(model.onnx_model)
        _atomic_save(logits, paths["logits"])
        _atomic_save(global_pools(logits), paths["onnxruntime"])
        for stale in (paths["ncnn"], paths["mnn"]):
            stale.unlink(missing_ok=True)
    shape = model.input_shapes[model.input_name]
    if "ncnn" in engines and not paths["ncnn"].exists():
        _convert_ncnn(paths["onnxruntime"], shape, paths["ncnn"])
    if "mnn" in engines and not paths["mnn"].exists():
        _convert_mnn(paths["onnxruntime"], paths["mnn"])
    return {k: v for k, v in paths.items() if k in ("logits", *engines)}


def _converter(command: str) -> str:
    path = shutil.which(command) or shutil.which(command, path=str(Path(sys.executable).parent))
    if path is None:
        raise RebirthError(f"converting models for the peers needs `{command}`: "
                           f"pip install '{CONVERTERS[command]}' (or pip install -e '.[peers]')")
    return path


def _convert_ncnn(onnx_path: Path, shape, out: Path) -> None:
    """pnnx ONNX -> ncnn (fp32 weights), run in a scratch dir; keeps .ncnn.param/.ncnn.bin."""
    pnnx = _converter("pnnx")
    logger.info(f"[peers] converting {onnx_path.parent.name} to ncnn (pnnx)")
    with tempfile.TemporaryDirectory(prefix="tvm-rebirth-pnnx-") as tmp:
        src = Path(tmp) / "engine.onnx"
        shutil.copy(onnx_path, src)
        proc = subprocess.run([pnnx, src.name, f"inputshape=[{','.join(map(str, shape))}]f32",
                               "fp16=0"], cwd=tmp, capture_output=True, text=True)
        param, weights = Path(tmp) / "engine.ncnn.param", Path(tmp) / "engine.ncnn.bin"
        if proc.returncode != 0 or not param.exists() or not weights.exists():
            raise RebirthError(f"pnnx could not convert {onnx_path}: "
                               f"{_last_line(proc.stderr or proc.stdout, 'no output')}")
        shutil.copy(weights, out.with_suffix(".bin"))
        shutil.copy(param, out.with_name(f".{out.name}.tmp"))
        os.replace(out.with_name(f".{out.name}.tmp"), out)  # the param last: it marks done


# MNN's `mnnconvert` wrapper reports usage to a server and, when the reporting SDK is
# missing, `pip install`s it (which downgrades protobuf under onnx): call the converter
# extension itself instead
_MNN_CONVERT = "import sys, _tools; _tools.mnnconvert(['mnnconvert'] + sys.argv[1:])"


def _convert_mnn(onnx_path: Path, out: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("MNN") is None or importlib.util.find_spec("_tools") is None:
        raise RebirthError(f"converting models for the peers needs MNN's converter: pip install "
                           f"'{CONVERTERS['mnnconvert']}' (or pip install -e '.[peers]')")
    logger.info(f"[peers] converting {onnx_path.parent.name} to MNN (mnnconvert)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    proc = subprocess.run([sys.executable, "-c", _MNN_CONVERT, "-f", "ONNX", "--modelFile",
                           str(onnx_path), "--MNNModel", str(tmp), "--bizCode", "tvm-rebirth"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RebirthError(f"mnnconvert could not convert {onnx_path}: "
                           f"{_last_line(proc.stderr or proc.stdout, 'no output')}")
    os.replace(tmp, out)


def logits_module(mod):
    """``mod`` with main's final softmax (reshapes after it allowed) removed: main returns
    the logits; unchanged when main does not end in a softmax."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    func = mod["main"]
    var2val = relax.analysis.get_var2val(func)
    body = func.body
    result = body.body if isinstance(body, relax.SeqExpr) else body
    final = var2val.get(result, result) if isinstance(result, relax.Var) else result
    while (isinstance(final, relax.Call) and getattr(final.op, "name", "") == "relax.reshape"
           and isinstance(final.args[0], relax.Var)):  # reshapes after it keep the logits
        final = var2val.get(final.args[0], final.args[0])
    if not (isinstance(final, relax.Call) and getattr(final.op, "name", "") == "relax.nn.softmax"):
        return mod
    arg = wildcard()
    func = rewrite_call(is_op("relax.nn.softmax")(arg),
                        lambda expr, matches: matches[arg] if expr.same_as(final) else expr, func)
    new = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    new["main"] = func
    return relax.transform.DeadCodeElimination(["main"])(new)


def reference_logits(logits_onnx: Path, x) -> np.ndarray:
    """ONNX Runtime on this host (1 thread) on the model cut before its Softmax."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(logits_onnx), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def compare(out, ref) -> dict:
    """max abs diff of ``out`` (reshaped) from ``ref`` and that relative to max |ref|."""
    out = np.asarray(out, dtype=np.float32)
    if out.size != ref.size:
        raise RebirthError(f"an engine's output has {out.size} values, the reference {ref.size}")
    diff = float(np.abs(out.reshape(ref.shape) - ref).max())
    return {"max_abs_diff": diff, "relative": diff / max(float(np.abs(ref).max()), 1e-30)}


# --------------------------------------------------------------------------- this CPU

class EngineProcess:
    """One engine in its own process (``peer_engine.py serve``): loaded and warmed up on
    construction (``output``: its warm-up output), ``run(number)`` -> mean ms."""

    def __init__(self, name, engine, model_path, x, threads, workdir: Path, env=None):
        self.name, self.workdir = name, Path(workdir)
        stem = name.replace(" ", "_")
        inp, out = self.workdir / f"{stem}-input.npy", self.workdir / f"{stem}-output.npy"
        np.save(inp, x)
        self.log = self.workdir / f"{stem}.log"
        env = dict(os.environ, **(env or {}), TVM_NUM_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads), ORT_DISABLE_TELEMETRY="1")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ENGINE_SCRIPT), engine, str(model_path), str(inp),
                 str(out), str(threads), "serve"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self._expect("ready")
        self.output = np.load(out)

    def _expect(self, what=None) -> str:
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            self.proc.wait()
            raise RebirthError(f"the {self.name} worker failed: "
                               f"{_last_line(self.log.read_text(), 'no output')}")
        return line.strip()

    def run(self, number: int) -> float:
        self.proc.stdin.write(f"run {number}\n")
        self.proc.stdin.flush()
        return float(self._expect())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def time_engines(engines: dict, x, threads: int, number: int, rounds: int, workdir,
                 label="peers", settle=0.2) -> tuple:
    """({name: [ms per round]}, {name: output}) of ``engines`` ({name: (engine, model path)},
    see peer_engine.py), each in its own process, all loaded and warmed up first, then timed
    in alternating rounds; between turns a ``settle`` pause lets the last engine's threads
    stop spinning."""
    procs = {}
    try:
        for name, (engine, path) in engines.items():
            logger.info(f"[{label}] starting {name} in its own process")
            procs[name] = EngineProcess(name, engine, path, x, threads, workdir)
        samples = {name: [] for name in procs}
        for r in range(rounds):
            for name, proc in procs.items():
                time.sleep(settle)
                samples[name].append(proc.run(number))
            logger.info(f"[{label}] round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {v[-1]:.2f} ms" for n, v in samples.items()))
        return samples, {name: proc.output for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.close()


def time_on_host(model, tvm_mods: dict, x, threads: int, number: int, rounds: int, workdir,
                 label="peers") -> dict:
    """ONNX Runtime on ``model``'s ONNX file against tvm-rebirth's builds of ``tvm_mods``
    ({name: IRModule}) on this CPU, every engine in its own process with ``threads``
    threads: each TVM module untuned (``<name>_untuned``: generic schedule) and, when this
    CPU has tuning_logs, tuned (``<name>_tuned``). First ONNX Runtime alone in a fresh
    process (``onnxruntime_alone``: the check that the race stole nobody's cores), then all
    in alternating rounds (``rounds``: {name: [ms]}). Also ``max_abs_diff_vs_onnxruntime``,
    ``tuned_functions`` {name: [tuned, functions]}, ``tuning_logs``, ``target_key``."""
    from ..compile.build import compile_module, export_library, host_target
    from ..compile.database import load_database, target_key

    workdir = Path(workdir)
    target = host_target()
    has_logs = load_database(target) is not None
    engines = {"onnxruntime_original": ("onnxruntime", model.path)}
    tuned_functions = {}
    for name, mod in tvm_mods.items():
        for variant in ("untuned", "tuned") if has_logs else ("untuned",):
            key = f"{name}_{variant}"
            logger.info(f"[{label}] building {key} for this CPU")
            compiled = compile_module(mod, target, tuned=variant == "tuned")
            export_library(compiled.executable, str(workdir / f"{key}.so"), target)
            engines[key] = ("tvm", workdir / f"{key}.so")
            tuned_functions[key] = [compiled.tuned, compiled.functions]
    logger.info(f"[{label}] ONNX Runtime alone in a fresh process")
    alone, _ = time_engines({"onnxruntime_alone": engines["onnxruntime_original"]}, x, threads,
                            number, rounds, workdir, label)
    samples, outputs = time_engines(engines, x, threads, number, rounds, workdir, label)
    ref = outputs["onnxruntime_original"]
    return {"rounds": samples, "onnxruntime_alone": alone["onnxruntime_alone"],
            "max_abs_diff_vs_onnxruntime": {n: compare(o, ref)["max_abs_diff"]
                                            for n, o in outputs.items() if n in tuned_functions},
            "tuned_functions": tuned_functions, "tuning_logs": has_logs,
            "target_key": target_key(target)}


# --------------------------------------------------------------------------- emulated A72

def peers_site_dir() -> Path:
    from .device import sysroot_dir

    return sysroot_dir() / "peers"


def ensure_guest_cpuinfo(root: Path) -> None:
    """The sysroot's /proc/cpuinfo (qemu's -L resolves it) describing four Cortex-A72s."""
    cpuinfo = root / "root" / "proc" / "cpuinfo"
    if not cpuinfo.exists():
        cpuinfo.parent.mkdir(parents=True, exist_ok=True)
        cpuinfo.write_text("".join(_A72_CPUINFO.format(i=i) for i in range(4)))


def ensure_peers_site() -> Path:
    """The emulated device's sysroot (built once) with the peers' aarch64 wheels unpacked
    into ``peers/`` beside it (built once; ``$TVM_REBIRTH_PEER_WHEELS``: a folder of those
    wheels to use instead of the package index)."""
    from .device import ensure_sysroot

    root = ensure_sysroot()
    ensure_guest_cpuinfo(root)
    site = peers_site_dir()
    wanted = sorted(GUEST_PEER_WHEELS.values())
    ready = site / "ready.json"
    if ready.exists() and json.loads(ready.read_text()).get("wheels") == wanted:
        return site
    build = site.with_name(f"peers.build{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    wheels = build / "wheels"
    wheels.mkdir(parents=True)
    try:
        local = os.environ.get("TVM_REBIRTH_PEER_WHEELS")
        logger.info(f"[peers] fetching the aarch64 wheels {', '.join(wanted)} "
                    f"({'from ' + local if local else 'pip download'}; once)")
        index = ["--no-index", "--find-links", local] if local else []
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--platform", "manylinux2014_aarch64", "--platform",
             "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
             "--python-version", "3.11", "-d", str(wheels), *index, *wanted],
            capture_output=True, text=True)
        found = sorted(wheels.glob("*.whl"))
        if proc.returncode != 0 or len(found) != len(wanted):
            raise RebirthError(f"the peers' aarch64 wheels ({', '.join(wanted)}) could not be "
                               f"downloaded: {_last_line(proc.stderr, 'no wheel found')} (needs "
                               "network, or $TVM_REBIRTH_PEER_WHEELS set to a folder of them)")
        for wheel in found:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(build / "site")
        shutil.rmtree(wheels)
        (build / "site" / "ready.json").write_text(json.dumps(
            {"wheels": wanted, "built": time.time()}) + "\n")
        shutil.rmtree(site, ignore_errors=True)
        os.replace(build / "site", site)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return site


def count_guest(engine: str, model_path: Path, x, workdir: Path, runs: int = 1,
                plugin=None) -> tuple:
    """(instructions per inference, output) of ``engine`` running ``model_path`` in the
    emulated device's Python: qemu-user as a Cortex-A72, 1 thread, one warm-up inference,
    then ``runs`` counted by the plugin between the markers (``plugin``: its path, default
    compiled on first use; callers running guests in parallel pass it)."""
    from .remote import count_guest_run

    stem = f"{engine}-{Path(model_path).stem.replace('.', '_')}"
    inp, out = workdir / f"{stem}-input.npy", workdir / f"{stem}-output.npy"
    np.save(inp, x)
    instructions = count_guest_run(
        [ENGINE_SCRIPT, engine, model_path, inp, out, "1", "count", runs],
        workdir / f"{stem}-count.txt", runs, engine,
        env={"OMP_NUM_THREADS": "1", "ORT_DISABLE_TELEMETRY": "1",
             "PYTHONPATH": str(peers_site_dir())}, plugin=plugin, timeout=7200)
    if not out.exists():
        raise RebirthError(f"{engine} under qemu (cortex-a72) wrote no output {out}")
    return instructions, np.load(out)


def count_on_emulated_device(model, tvm_mods: dict, x, workdir, engines=PEER_ENGINES,
                             target_name="cortex-a72", jobs=None) -> dict:
    """Guest instructions per inference (qemu cortex-a72, 1 thread) of the peer ``engines``
    on ``model``'s original graph and of tvm-rebirth's builds of ``tvm_mods`` ({name:
    IRModule}, e.g. tvm_original / tvm_rebirth, cross-built for ``target_name``), all on
    input ``x`` and cut before the final Softmax; every output compared with ONNX Runtime
    on this host. Returns {"<engine>_original_instructions" | "<tvm name>_instructions":
    int, "logits_vs_host_onnxruntime": {name: {max_abs_diff, relative}}, ...}; ``jobs``
    guests run at once (default: the cores; counts do not depend on load)."""
    from ..compile.build import compile_module, export_library
    from ..compile.targets import resolve_target
    from ..report.measure import count_gflops
    from .remote import plugin_path

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_peers_site()
    models = prepare_models(model, engines)
    ref = reference_logits(models["logits"], x)
    runs = {f"{e}_original": (e, models[e]) for e in engines}
    target = resolve_target(target_name)
    for name, mod in tvm_mods.items():
        logger.info(f"[peers] cross-building {name} for {target_name}")
        lib = workdir / f"{name}.so"
        export_library(compile_module(logits_module(mod), target).executable, str(lib), target)
        runs[name] = ("tvm", lib)

    plugin = plugin_path()  # compiled once, before the guests run in parallel

    def one(item):
        name, (engine, path) = item
        logger.info(f"[peers] counting {name} on the emulated {target_name} (1 thread)")
        return name, count_guest(engine, path, x, workdir, plugin=plugin)

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        counted = dict(pool.map(one, runs.items()))
    result = {f"{name}_instructions": n for name, (n, _) in counted.items()}
    macs = count_gflops(model.mod) * 1e9 / 2
    result["mac_floor_instructions"] = int(round(macs / 4))
    result["logits_vs_host_onnxruntime"] = {name: compare(out, ref)
                                           for name, (_, out) in counted.items()}
    result["max_abs_logit"] = float(np.abs(ref).max())
    result["engines"] = dict(GUEST_PEER_WHEELS, tvm=f"apache-tvm (this build, {target_name})")
    result["device"] = f"aarch64 {target_name} (emulated: qemu-user -cpu {target_name}, 1 thread)"
    return result
