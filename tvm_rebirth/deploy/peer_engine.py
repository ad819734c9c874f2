"""One inference engine alone in its own process: the worker behind deploy/peers.

    python peer_engine.py ENGINE MODEL INPUT.npy OUTPUT.npy THREADS count RUNS
    python peer_engine.py ENGINE MODEL INPUT.npy OUTPUT.npy THREADS serve

ENGINE is onnxruntime (MODEL: .onnx), ncnn (MODEL: the .ncnn.param, its .ncnn.bin beside it;
fp32 storage and arithmetic), mnn (MODEL: .mnn) or tvm (MODEL: an exported Relax library).
The engine loads the model with THREADS threads, runs INPUT once (warm-up) and saves the
output to OUTPUT.npy. Then ``count``: RUNS more inferences between the lseek markers the
instruction-counting QEMU plugin recognises (run in the emulated device's Python);
``serve``: prints ``ready`` and answers every ``run N`` line on stdin with the mean
milliseconds of N inferences, until ``quit`` (the host times each engine in its own process,
so no other engine's thread pool lives beside it). The protocol has stdout to itself: the
engines' own prints go to stderr.

Standalone on purpose: it imports numpy and the one engine, nothing of tvm-rebirth.
"""

import os
import sys
import time

import numpy as np

MARK_START, MARK_STOP = 0x5EB1, 0x5EB2


def mark(code):
    try:
        os.lseek(-1, code, 0)
    except OSError:
        pass


def onnxruntime_engine(path, x, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})[0]


def ncnn_blob_names(param_path):
    """(input blob, output blob) of an ncnn .param: the Input layer's blob and the one blob
    produced and never consumed."""
    produced, consumed, first = [], set(), None
    with open(param_path) as f:
        lines = f.read().split("\n")[2:]
    for line in lines:
        words = line.split()
        if len(words) < 4:
            continue
        n_in, n_out = int(words[2]), int(words[3])
        ins, outs = words[4:4 + n_in], words[4 + n_in:4 + n_in + n_out]
        if words[0] == "Input" and first is None:
            first = outs[0]
        consumed.update(ins)
        produced += outs
    last = [b for b in produced if b not in consumed]
    return first, last[-1]


def ncnn_engine(path, x, threads):
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = threads
    # fp32 end to end: ncnn keeps fp16 weights/activations on Arm unless told not to
    for flag in ("use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed",
                 "use_bf16_storage"):
        setattr(net.opt, flag, False)
    net.opt.use_vulkan_compute = False
    if net.load_param(path) != 0 or net.load_model(path[:-len(".param")] + ".bin") != 0:
        raise SystemExit(f"ncnn could not load {path}")
    blob_in, blob_out = ncnn_blob_names(path)
    data = np.ascontiguousarray(x[0])

    def run():
        ex = net.create_extractor()
        ex.input(blob_in, ncnn.Mat(data))
        ret, out = ex.extract(blob_out)
        if ret != 0:
            raise SystemExit(f"ncnn extract failed ({ret})")
        return np.array(out)[None]
    return run


def mnn_engine(path, x, threads):
    import MNN

    interpreter = MNN.Interpreter(path)
    session = interpreter.createSession({"numThread": threads})
    tensor_in = interpreter.getSessionInput(session)
    host_in = MNN.Tensor(x.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe)

    def run():
        tensor_in.copyFrom(host_in)
        interpreter.runSession(session)
        out = interpreter.getSessionOutput(session)
        shape = out.getShape()
        host_out = MNN.Tensor(shape, MNN.Halide_Type_Float,
                              np.zeros(shape, dtype=np.float32), MNN.Tensor_DimensionType_Caffe)
        out.copyToHostTensor(host_out)
        return np.array(host_out.getData(), dtype=np.float32).reshape(shape)
    return run


def tvm_engine(path, x, threads):
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm
    from tvm.runtime import vm as runtime_vm

    device = tvm.cpu()
    main = runtime_vm.VirtualMachine(tvm.runtime.load_module(path), device)["main"]
    arg = tvm.runtime.tensor(x, device)

    return lambda: main(arg), lambda out: out.numpy()


ENGINES = {"onnxruntime": onnxruntime_engine, "ncnn": ncnn_engine, "mnn": mnn_engine,
           "tvm": tvm_engine}


def main(argv):
    engine, model, input_path, output_path, threads, mode = argv[:6]
    protocol = None
    if mode == "serve":  # stdout is the protocol's; engines print to stderr
        protocol = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
    x = np.ascontiguousarray(np.load(input_path).astype(np.float32))
    made = ENGINES[engine](model, x, int(threads))
    run, to_numpy = made if isinstance(made, tuple) else (made, np.asarray)
    np.save(output_path, to_numpy(run()))  # warm-up; the first run allocates
    if mode == "count":
        runs = int(argv[6])
        mark(MARK_START)
        for _ in range(runs):
            run()
        mark(MARK_STOP)
        return 0
    protocol.write("ready\n")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        number = int(words[1])
        start = time.perf_counter()
        for _ in range(number):
            run()
        protocol.write(f"{(time.perf_counter() - start) / number * 1000:.6f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
