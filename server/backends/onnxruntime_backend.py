"""The ONNX Runtime backend: the ONNX models the exporter recorded in the bundle manifest
(`artifacts["onnx"]`), on the TensorRT, CUDA or CPU execution provider, whichever is available and
asked for.

On the CPU, outputs arrive as NumPy arrays and post-processing runs in NumPy, except the float16
cast of the answer, which ONNX Runtime's vectorised Cast does about 20x faster (`half_cast`). On a GPU,
when torch with CUDA is installed, inputs and outputs are bound to torch tensors on the GPU (I/O
binding) and post-processing runs there in torch (`TorchOps`): only the answer is copied to the
host. Without torch it falls back to NumPy on the host, and says so in the backend's warnings.

The TensorRT execution provider gets an explicit optimisation profile for `images` covering every
size and batch the model serves (`tensorrt_profile_options`), so it builds its engine once (and
caches it under `~/.cache/cotap/ort-trt`, created before the session) instead of rebuilding it for
each new input shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cotap.core.artifacts import (
    INPUT_NAME,
    OUTPUT_NAMES,
    OnnxArtifact,
    onnx_artifacts,
    serving_onnx,
    sizes_text,
)
from cotap.core.bundle import Bundle
from cotap.core.version import install_hint
from cotap.server.backends.base import Backend, BackendError, BackendOptions, NumpyOps, cuda_index
from cotap.server.backends.half_cast import HalfCast

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_TRT_EP = "TensorrtExecutionProvider"
TRT_EP_OPT_BATCH = 8  # the batch the TensorRT EP tunes for (capped by the model's max batch)


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(
            f"onnxruntime is not installed: {install_hint('serve')}; for CUDA, then "
            "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`"
        ) from e
    return ort


def choose_artifact(bundle: Bundle, precision: str, gpu: bool) -> OnnxArtifact:
    """The ONNX model to serve for `precision` (auto: fp16 on a GPU, else fp32, else what exists),
    among those exported for every input size the bundle declares (`serving_onnx`)."""
    records = onnx_artifacts(bundle)
    if not records:
        raise BackendError(
            f"bundle {bundle.config.name!r} ({bundle.path}) has no ONNX model: build one with "
            f"`cotap export onnx --bundle {bundle.path}`, or serve it with --backend torch"
        )
    by_precision = serving_onnx(bundle)
    if not by_precision:
        raise BackendError(
            f"no ONNX model of bundle {bundle.config.name!r} covers its input sizes "
            f"({sizes_text(bundle.config.input_sizes)}; exported: "
            + "; ".join(f"{r.file}: {sizes_text(r.sizes)}" for r in records)
            + f"); re-export with `cotap export onnx --bundle {bundle.path}`, or serve it with --backend torch"
        )
    if precision == "auto":
        order = ("fp16", "fp32", "int8") if gpu else ("fp32", "fp16", "int8")
        return next(by_precision[p] for p in order if p in by_precision)
    if precision not in by_precision:
        raise BackendError(
            f"bundle {bundle.config.name!r} has no {precision} ONNX model for its input sizes (it has "
            f"{', '.join(sorted(by_precision))}): `cotap export onnx --bundle {bundle.path} --precision {precision}`"
        )
    return by_precision[precision]


def choose_providers(ort: Any, device: str) -> tuple[list[Any], bool]:
    """(providers in preference order, whether a GPU was asked for)."""
    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"], False
    index = cuda_index(device) or 0
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if not gpu:
        if device == "auto":
            return ["CPUExecutionProvider"], False
        raise BackendError(
            f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
            f"(available: {sorted(available)}); replace onnxruntime with onnxruntime-gpu "
            "(`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`) or use --device cpu"
        )
    providers: list[Any] = []
    for p in gpu:
        opts: dict[str, Any] = {"device_id": index}
        if p == _TRT_EP:
            opts["trt_engine_cache_enable"] = True  # the cache path is the model's: with_tensorrt_profile
        providers.append((p, opts))
    return [*providers, "CPUExecutionProvider"], True


def trt_engine_cache_dir(model_sha256: str) -> Path:
    """The TensorRT EP's engine cache for one ONNX file, created (with its parents) here: ONNX
    Runtime creates only the last component, and fails when `~/.cache/cotap` does not exist yet.
    One folder per model file because the EP names cached engines after the graph's file, input and
    node names, not its weights: two bundles of one architecture would load each other's engines."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cotap" / "ort-trt"
    cache = root / (model_sha256[:16] or "unhashed")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(
            f"cannot create the TensorRT execution provider's engine cache {cache} ({e}); set "
            "XDG_CACHE_HOME to a writable directory"
        ) from e
    return cache


def tensorrt_profile_options(record: OnnxArtifact) -> dict[str, str]:
    """TensorRT EP options giving `images` one explicit optimisation profile that covers every size
    and batch the model serves: min 1 x 3 x smallest H x smallest W, max max_batch x 3 x largest H
    x largest W, opt at the record's first size and `TRT_EP_OPT_BATCH`. Without them the EP builds
    its engine for the first input shape and rebuilds it whenever a later shape falls outside.
    One profile, not one per size: the EP builds several profiles per input when given them, but
    its execution context stays on profile 0, so inputs of the other profiles fail (runtime
    switching is proposed in microsoft/onnxruntime pull request 31624)."""
    hs = [h for h, _ in record.sizes]
    ws = [w for _, w in record.sizes]
    max_batch = max(1, record.max_batch)
    opt_h, opt_w = record.sizes[0]

    def shape(b: int, h: int, w: int) -> str:
        return f"{INPUT_NAME}:{b}x3x{h}x{w}"

    return {
        "trt_profile_min_shapes": shape(1, min(hs), min(ws)),
        "trt_profile_opt_shapes": shape(min(TRT_EP_OPT_BATCH, max_batch), opt_h, opt_w),
        "trt_profile_max_shapes": shape(max_batch, max(hs), max(ws)),
    }


def with_tensorrt_profile(providers: list[Any], record: OnnxArtifact) -> list[Any]:
    """`providers` with the TensorRT EP's options for `record`: its optimisation profile
    (`tensorrt_profile_options`) and its own engine cache (`trt_engine_cache_dir`)."""
    out: list[Any] = []
    for p in providers:
        if isinstance(p, tuple) and p[0] == _TRT_EP:
            cache = str(trt_engine_cache_dir(record.sha256))
            p = (p[0], {**p[1], **tensorrt_profile_options(record), "trt_engine_cache_path": cache})
        out.append(p)
    return out


class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, bundle: Bundle, options: BackendOptions, bind_torch: bool | None = None) -> None:
        """`bind_torch`: bind inputs and outputs to torch tensors and post-process in torch (default:
        on a GPU); tests turn it on for the CPU, where the same code runs."""
        super().__init__(bundle, options)
        ort = _import_ort()
        providers, want_gpu = choose_providers(ort, options.device)
        record = choose_artifact(bundle, options.precision, want_gpu)
        providers = with_tensorrt_profile(providers, record)
        if record.forced:
            # the exporter wrote it although its accuracy gate failed: serve it, but say so
            self.warnings.append(f"{record.file} was exported with --force: its accuracy gate failed")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        so.log_severity_level = 3
        # No busy-waiting between runs: the pool's threads would spin on the cores that decode images
        # and serve HTTP (measured under load here: equal or better images/s, 16-40 % less CPU per image).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if record.file.startswith("engines/") or not bundle.has(record.file):
            raise BackendError(f"ONNX record {record.file!r} names no file of the bundle")
        try:
            self.session = ort.InferenceSession(bundle.read_verified(record.file), so, providers=providers)
        except Exception as e:
            raise BackendError(f"onnxruntime cannot load {record.file} from {bundle.path}: {e}") from e
        active = self.session.get_providers()
        if want_gpu and not any(p in active for p in _GPU_PROVIDERS):
            if options.device != "auto":
                raise BackendError(
                    f"onnxruntime fell back to the CPU (providers {active}); the CUDA/TensorRT providers "
                    "could not load their libraries. Install CUDA/cuDNN or use --device cpu"
                )
            want_gpu = False
        self._check_io()
        self.record = record
        self.precision = record.precision
        self.providers = active
        self.device = "cuda" if any(p in active for p in _GPU_PROVIDERS) else "cpu"
        self.max_batch = record.max_batch or None
        self.sizes = frozenset(record.sizes)  # position embeddings exist for these sizes only
        batch_dim = self.session.get_inputs()[0].shape[0]
        if isinstance(batch_dim, int) and batch_dim > 0:
            self.max_batch = batch_dim
        self._bound: TorchBoundIO | None = None
        if bind_torch is None:
            bind_torch = self.device == "cuda"
        if bind_torch:
            where = f"cuda:{cuda_index(options.device) or 0}" if self.device == "cuda" else "cpu"
            self._bound = TorchBoundIO.create(bundle, where)
            if self._bound is None:
                self.warnings.append(
                    "post-processing runs in NumPy on the host: install torch with CUDA to keep it on the GPU"
                )
            else:
                self.ops = self._bound.ops
        if self._bound is None:
            self.ops = NumpyOps(half=HalfCast(ort))

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise BackendError(
                f"ONNX model has inputs {inputs} and outputs {outputs}; the bundle contract is input "
                f"{INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}"
            )
        shape = self.session.get_inputs()[0].shape  # [B, 3, H, W], ints where static
        static = [(int(h), int(w)) for h, w in [shape[2:4]] if isinstance(h, int) and isinstance(w, int)]
        if static:
            bad = [s for s in self.bundle.config.input_sizes if s != static[0]]
            if bad:
                raise BackendError(
                    f"ONNX model has a static input size {static[0]}, the bundle declares {bad}; "
                    "re-export with dynamic sizes"
                )

    def forward(self, images: np.ndarray) -> dict[str, Any]:
        x = np.ascontiguousarray(images, dtype=np.float32)  # (B, 3, H, W)
        if self._bound is not None:
            return self._bound.run(self.session, x)
        outs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d |= {
            "onnx_file": self.record.file,
            "providers": self.providers,
            "gate_passed": self.record.gate.get("passed"),
            "forced": self.record.forced,
        }
        return d

    def close(self) -> None:
        del self.session


class TorchBoundIO:
    """Runs the session with its input and outputs bound to torch tensors on the model's device
    (ONNX Runtime I/O binding), so that outputs stay there for `TorchOps`."""

    def __init__(self, torch: Any, device: Any, bundle: Bundle) -> None:
        from cotap.server.backends.torch_ops import TorchOps

        self.torch = torch
        self.device = device  # torch.device; ONNX Runtime names its type ("cuda", "cpu") alike
        self.device_id = device.index or 0
        cfg = bundle.config
        self.patch, self.dim, self.prototypes = cfg.patch_size, cfg.embed_dim, cfg.num_prototypes
        self.ops = TorchOps(device)

    @classmethod
    def create(cls, bundle: Bundle, device: str) -> TorchBoundIO | None:
        """For `device` "cpu" or "cuda:N"; None when torch (with CUDA, for a GPU) is not installed."""
        try:
            import torch
        except ImportError:
            return None
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return None
        return cls(torch, dev, bundle)

    def run(self, session: Any, images: np.ndarray) -> dict[str, Any]:
        torch = self.torch
        x = torch.from_numpy(images).to(self.device)  # (B, 3, H, W)
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        shapes = {
            "patch": (b, gh, gw, self.dim),
            "cls": (b, self.dim),
            "assign": (b, gh, gw, self.prototypes),
        }
        outs = {n: torch.empty(shapes[n], dtype=torch.float32, device=self.device) for n in OUTPUT_NAMES}
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the input copy is done
        binding = session.io_binding()
        binding.bind_input(
            INPUT_NAME, self.device.type, self.device_id, np.float32, tuple(x.shape), x.data_ptr()
        )
        for name, t in outs.items():
            binding.bind_output(
                name, self.device.type, self.device_id, np.float32, tuple(t.shape), t.data_ptr()
            )
        session.run_with_iobinding(binding)  # returns once the outputs are written
        return outs
