"""Device memory, streams and CUDA graphs for the TensorRT backend.

cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6) is NVIDIA's current
binding and what TensorRT 10's samples use; pycuda is accepted when that is what a device
has (no CUDA graphs then). Both are imported lazily. Every call here needs a GPU and a
driver: unverified on hardware in this repository (tests marked `gpu`).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


class CudaRuntime:
    """cuda-python flavour: raw pointers as ints, errors checked on every call."""
    name = "cuda-python"
    graphs = True

    def __init__(self) -> None:
        self.rt = _cudart()
        self.stream = self._ok(self.rt.cudaStreamCreate())

    def _ok(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            _, msg = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
        return rest[0] if len(rest) == 1 else rest or None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr))

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        self._ok(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                         self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def begin_capture(self) -> None:
        self._ok(self.rt.cudaStreamBeginCapture(self.stream,
                                                self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self):
        graph = self._ok(self.rt.cudaStreamEndCapture(self.stream))
        return self._ok(self.rt.cudaGraphInstantiate(graph, 0))

    def launch(self, graph_exec) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, self.stream))


class PyCudaRuntime:
    """pycuda flavour (no graph capture)."""
    name = "pycuda"
    graphs = False

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the context)
        import pycuda.driver as cuda

        self.cuda = cuda
        self.stream = cuda.Stream()
        self._allocs: dict[int, object] = {}

    @property
    def stream_handle(self) -> int:
        return self.stream.handle

    def alloc(self, nbytes: int) -> int:
        a = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, np.ascontiguousarray(host), self.stream)

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self.stream)

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self.cuda.memcpy_dtod_async(dst, src, nbytes, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()


def open_runtime(prefer: str = "auto"):
    errors = []
    for kind, cls in (("cuda-python", CudaRuntime), ("pycuda", PyCudaRuntime)):
        if prefer not in ("auto", kind):
            continue
        try:
            return cls()
        except Exception as e:  # not installed, or no driver/GPU
            errors.append(f"{kind}: {e}")
    raise InputError("no CUDA runtime usable (" + "; ".join(errors) + "); install cuda-python on the device")


def device_sm(device: int = 0) -> str:
    rt = CudaRuntime()
    props = rt._ok(rt.rt.cudaGetDeviceProperties(device))
    return f"sm{props.major}{props.minor}"


__all__ = ["CudaRuntime", "PyCudaRuntime", "open_runtime", "device_sm"]
