"""The ONNX Runtime backend: the CPU fallback everywhere, CUDA or TensorRT execution providers where installed.

"Building" runs ONNX Runtime's graph optimizer once per bucket and saves the optimized graph (fused integer
kernels, constant-folded, with its initializers in a file beside it), so loading skips optimization. An
optimized graph is specific to the ONNX Runtime version and, at the highest level, to the CPU's instruction
set: both are recorded, and `load` refuses a mismatch rather than run something slower or wrong.

Integer kernels: on x86 CPUs without VNNI, ONNX Runtime's u8s8 GEMM adds pairs of u8 x s8 products into a
saturating int16 and drifts from the graph (engines/fidelity.py says why). The build probes the CPU's kernel
(`u8s8_saturates`) and, where it saturates, sets ONNX Runtime's `session.x64quantprecision`, which stores the
weights as uint8 (zero point 128: the same grid) so the exact u8u8 kernels run. VNNI CPUs keep u8s8: there
the flag is not needed, and it would change their kernels too.

K sessions share one CPU memory arena. Measured on `digits` W8A8 (batch 8, 2 threads): loading and running
K = 1 / 4 / 8 buckets added 110 / 119 / 135 MB (`engines/memory.py`); a probe with one arena per session
took 515 MB for K = 8.

Weights: the buckets' optimized graphs differ only in what the activation scales touch (scales, folded
biases), so the build keeps one WEIGHTS_FILE of distinct initializers that every bucket graph references
(`SharedWeights`), and a process gives every session the same read-only mapping of it through
`SessionOptions.add_initializer` (`mapped_initializers`), instead of each session reading its own copy.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dilatequant.core.external_data import external_location, point_to
from dilatequant.core.manifest import ArtifactError
from dilatequant.core.optional import require

from .backend import BucketEngine, BuildContext, cpu_name
from .config import BuildConfig

WEIGHTS_FILE = "weights.bin"  # every bucket graph's initializers over 1 KiB, each distinct tensor once
ALIGNMENT = 64
EXTERNAL_MIN_BYTES = 1024
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def require_onnxruntime():
    return require("onnxruntime", "ONNX Runtime engines", "export")


def choose_provider(requested: str) -> str:
    available = require_onnxruntime().get_available_providers()
    if requested == "auto":
        return next((p for p in GPU_PROVIDERS if p in available), CPU_PROVIDER)
    if requested not in available:
        raise ArtifactError(f"Execution provider {requested} is not offered by the installed onnxruntime "
                            f"(available: {', '.join(available)}). Use --provider auto.")  # fmt: skip
    return requested


def intra_op_threads(config: BuildConfig) -> int:
    """Threads per session: as configured, or (0) the cores divided among the streams (0 with one stream lets
    ONNX Runtime take one per core)."""
    if config.threads or config.streams == 1:
        return config.threads
    return max(1, (os.cpu_count() or 1) // config.streams)


PRECISE_INTEGER_KERNELS = "session.x64quantprecision"


def precise_kernels(config: BuildConfig) -> bool:
    """Whether the engines run ONNX Runtime's exact u8u8 integer kernels (config 'auto': where u8s8 saturates)."""
    return u8s8_saturates() if config.integer_kernels == "auto" else config.integer_kernels == "u8u8"


# where a session built from bytes finds the external data its initializers point at
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def session_options(config: BuildConfig, optimize: bool):
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(config)
    options.log_severity_level = 3  # ORT's optimizer warns about every Unsqueeze it cannot remove
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if precise_kernels(config):
        options.add_session_config_entry(PRECISE_INTEGER_KERNELS, "1")
    if not config.prepack:  # each session would keep its own repacked copy of the integer weights
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this CPU's fused u8s8 kernels saturate: one Conv whose input codes and weights sit at the edges
    of their ranges (every int16 pair overflows), fused by ONNX Runtime vs run op by op. Asked of the kernel
    itself rather than of /proc/cpuinfo, which VMs and emulators may report differently from CPUID."""
    import onnx
    from onnx import helper, numpy_helper

    ort = require_onnxruntime()
    channels = 32
    weight = np.full((channels, channels, 1, 1), 127, np.int8)
    constants = {"w": weight, "ws": np.full(channels, 0.01, np.float32), "wz": np.zeros(channels, np.int8),
                 "s": np.float32(0.02), "z": np.uint8(128), "ys": np.float32(2.0), "yz": np.uint8(128)}  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0), helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]), helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]  # fmt: skip
    shape = [1, channels, 2, 2]
    graph = helper.make_graph(nodes, "u8s8_probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])  # fmt: skip
    payload = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9).SerializeToString()
    x = np.full(shape, 2.5, np.float32)  # codes 253: every pair of products is 2 * 253 * 127 = 64,262
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level, options.log_severity_level = level, 3
        outputs.append(ort.InferenceSession(payload, options, providers=[CPU_PROVIDER]).run(None, {"x": x})[0])
    return not np.array_equal(*outputs)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def version(self) -> str:
        return require_onnxruntime().__version__

    def device(self, config: BuildConfig) -> str:
        provider = choose_provider(config.provider)
        return cpu_name() if provider == CPU_PROVIDER else f"{provider} (GPU)"

    def build(self, context: BuildContext) -> dict:
        ort = require_onnxruntime()
        provider = choose_provider(context.config.provider)
        engines = {}
        with SharedWeights(context.staging / WEIGHTS_FILE) as shared:
            for key, graph in context.export_manifest["graphs"].items():
                options = session_options(context.config, optimize=True)
                options.optimized_model_filepath = str(context.staging / f"{key}.onnx")
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{key}.bin")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES))
                graph_input = optimizer_input(context.export_dir / graph, options, precise_kernels(context.config))
                ort.InferenceSession(graph_input, options, providers=[provider])
                shared.take(context.staging / f"{key}.onnx", context.staging / f"{key}.bin")
                engines[key] = f"{key}.onnx"
        kernels = "u8u8" if precise_kernels(context.config) else "u8s8"
        return {"engines": engines, "provider": provider, "integer_kernels": kernels, "u8s8_saturates": u8s8_saturates(),
                "weights_file": WEIGHTS_FILE, "weights_shared": shared.record()}  # fmt: skip

    def optimized_session(self, graph: bytes | Path, optimized_path: Path, config: BuildConfig, weights_dir: Path | None = None):
        """A CPU session over `graph` (serialized, or a file) optimized as the engines are, its optimized graph
        saved at `optimized_path`; a serialized graph's external data is read from `weights_dir`."""
        options = session_options(config, optimize=True)
        options.optimized_model_filepath = str(optimized_path)
        options.enable_cpu_mem_arena = False  # run once: an arena would only keep its peak
        if weights_dir is not None:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(weights_dir))
        payload = optimizer_input(graph, options, precise_kernels(config)) if isinstance(graph, Path) else graph
        return require_onnxruntime().InferenceSession(payload, options, providers=[CPU_PROVIDER])

    def load(self, engine_dir: Path, manifest: dict, bucket: str) -> OnnxRuntimeEngine:
        check_device(engine_dir, manifest, self.device(BuildConfig(provider=manifest["provider"])))
        if "weights_file" not in manifest:  # the engine format's major version changed with it; this names the cause
            raise ArtifactError(f"{engine_dir} keeps a copy of the weights per bucket (built by an older dilatequant); "
                                "this one shares one weights file. Rebuild the engines with `dilatequant build`.")  # fmt: skip
        config = BuildConfig.from_dict(manifest["build"], manifest["format_version"])
        return OnnxRuntimeEngine(engine_dir / manifest["engines"][bucket], config, manifest["provider"])


def optimizer_input(graph: Path, options, precise: bool) -> str | bytes:
    """What ONNX Runtime optimizes: the graph file, or — with the precise kernels on — the graph with a
    zero-point initializer of its own for every weight. ONNX Runtime 1.31's pass that converts weights to
    uint8 adds one converted zero point per layer under the shared name and fails ('Attempt to replace the
    existing tensor') when layers share one, as compact() makes them. Rewritten in memory, weights left in
    the export's files."""
    if not precise:
        return str(graph)
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    initializers, uses = {i.name: i for i in model.graph.initializer}, {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers and len(node.input) > 2:
            name = node.input[2]
            uses[name] = uses.get(name, 0) + 1
            if uses[name] > 1:
                copy = model.graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = node.input[2] = f"{name}#{uses[name]}"
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
    return model.SerializeToString()


class SharedWeights:
    """One weights file for every bucket graph: `take` moves an optimized graph's initializers from its own file
    into the shared one, each distinct tensor (by sha256) written once, and deletes its file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.referenced = 0

    def __enter__(self) -> SharedWeights:
        self.sink = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.sink.close()

    def take(self, graph: Path, own_weights: Path) -> None:
        import onnx

        model = onnx.load(str(graph), load_external_data=False)
        with open(own_weights, "rb") as source:
            for tensor in external_tensors(model):
                _, offset, length = external_location(tensor, graph.parent)
                source.seek(offset)
                point_to(tensor, self.path.name, *self.add(source.read(-1 if length is None else length)))
        onnx.save_model(model, str(graph))
        own_weights.unlink()

    def add(self, data: bytes) -> tuple[int, int]:
        """(offset, length) of `data` in the shared file, appended (aligned) unless an equal tensor is there."""
        self.referenced += len(data)
        digest = hashlib.sha256(data).digest()
        if digest not in self.offsets:
            self.sink.write(b"\0" * (-self.sink.tell() % ALIGNMENT))
            self.offsets[digest] = (self.sink.tell(), len(data))
            self.sink.write(data)
        return self.offsets[digest]

    def record(self) -> dict:
        """What the manifest says: bytes the graphs reference, and bytes the shared file holds."""
        return {"referenced_bytes": self.referenced, "stored_bytes": sum(length for _, length in self.offsets.values())}


def external_tensors(model) -> list:
    from onnx.external_data_helper import uses_external_data

    return [tensor for tensor in model.graph.initializer if uses_external_data(tensor)]


@functools.cache
def mapped_file(path: Path) -> mmap.mmap:
    """One read-only mapping of a weights file per process: every session's initializers are views of it."""
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def mapped_initializers(graph: Path) -> dict[str, object]:
    """OrtValues over the shared weights file's mapping for every external initializer of `graph` (add_initializer
    takes them as they are: the sessions of all buckets read one copy, paged in from the file)."""
    import onnx
    from onnx import helper

    ort = require_onnxruntime()
    values = {}
    for tensor in external_tensors(onnx.load(str(graph), load_external_data=False)):
        info = {entry.key: entry.value for entry in tensor.external_data}
        buffer = mapped_file(graph.parent / info["location"])
        array = np.frombuffer(buffer, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type), count=int(np.prod(tensor.dims, dtype=np.int64)),
                              offset=int(info["offset"])).reshape(tuple(tensor.dims))  # fmt: skip
        values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def check_device(engine_dir: Path, manifest: dict, device: str) -> None:
    if manifest["device"] != device:
        raise ArtifactError(f"{engine_dir} was built on {manifest['device']}; this machine is {device}. Optimized graphs "
                            "are specific to the instruction set: rebuild the engines here with `dilatequant build`.")  # fmt: skip


@functools.cache
def register_shared_arena() -> None:
    """One CPU memory arena for every session of the process (sessions opt in with use_env_allocators): one
    bucket runs at a time, so K sessions need one bucket's activation memory (times its streams), not K."""
    ort = require_onnxruntime()
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))


class OnnxRuntimeEngine(BucketEngine):
    """One bucket's sessions (`config.streams` of them): a batch is cut into one slice per session, run
    concurrently (ONNX Runtime releases the GIL), and put back together in order. `close` shuts the thread pool
    down and drops the sessions."""

    def __init__(self, path: Path, config: BuildConfig, provider: str) -> None:
        super().__init__(str(path))
        self.path, self.config, self.provider = path, config, provider
        self.sessions: list = []
        self.pool: ThreadPoolExecutor | None = None
        self.initializers: dict[str, object] = {}

    def _activate(self) -> None:
        options = session_options(self.config, optimize=False)
        if self.provider == CPU_PROVIDER:
            register_shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        ort = require_onnxruntime()
        self.initializers = mapped_initializers(self.path)  # kept alive as long as the sessions that read them
        for name, value in self.initializers.items():
            options.add_initializer(name, value)
        self.sessions = [ort.InferenceSession(str(self.path), options, providers=[self.provider]) for _ in range(self.config.streams)]
        self.pool = ThreadPoolExecutor(len(self.sessions), thread_name_prefix="ort-stream") if len(self.sessions) > 1 else None
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self.input_dtypes = {i.name: np.dtype(types[i.type]) for i in self.sessions[0].get_inputs()}

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.sessions, self.pool, self.initializers = [], None, {}

    def _infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        batch = len(next(iter(feeds.values())))
        if self.pool is None or batch < len(self.sessions):
            return self.sessions[0].run(None, feeds)[0].astype(np.float32, copy=False)
        cuts = np.linspace(0, batch, len(self.sessions) + 1).astype(int)
        slices = [{name: value[lo:hi] for name, value in feeds.items()} for lo, hi in zip(cuts[:-1], cuts[1:])]
        futures = [self.pool.submit(session.run, None, part) for session, part in zip(self.sessions, slices)]
        return np.concatenate([future.result()[0] for future in futures]).astype(np.float32, copy=False)


BACKEND = OnnxRuntimeBackend()
