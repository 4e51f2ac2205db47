"""ggml's shared libraries through ctypes: the CPU device, the RPC server, RPC devices.

llama-cpp-python ships its libraries in `llama_cpp/lib/`. pip copies the `.so` symlinks as
files, so `libggml.so` and `libggml.so.0` are two copies with two device registries:
`libllama.so` links `libggml.so.0`, so that is the one we open, by full path (the loader
then hands back the very copy llama.cpp uses). Devices registered anywhere else are ignored.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

GGML_BACKEND_DEVICE_TYPE_CPU = 0


@functools.cache
def lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


class Ggml:
    """The few ggml entry points Corral needs, bound once."""

    def __init__(self) -> None:
        d = lib_dir()
        mode = ctypes.RTLD_GLOBAL
        self.base = ctypes.CDLL(str(d / "libggml-base.so.0"), mode=mode)
        self.ggml = ctypes.CDLL(str(d / "libggml.so.0"), mode=mode)
        self.rpc = ctypes.CDLL(str(d / "libggml-rpc.so.0"), mode=mode)
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t

        self.ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        self.ggml.ggml_backend_dev_by_type.restype = vp
        self.ggml.ggml_backend_reg_by_name.argtypes = [cp]
        self.ggml.ggml_backend_reg_by_name.restype = vp
        self.ggml.ggml_backend_register.argtypes = [vp]
        self.ggml.ggml_backend_register.restype = None
        self.ggml.ggml_backend_dev_count.argtypes = []
        self.ggml.ggml_backend_dev_count.restype = sz
        self.base.ggml_backend_reg_get_proc_address.argtypes = [vp, cp]
        self.base.ggml_backend_reg_get_proc_address.restype = vp
        self.base.ggml_backend_reg_dev_count.argtypes = [vp]
        self.base.ggml_backend_reg_dev_count.restype = sz
        self.rpc.ggml_backend_rpc_start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
        self.rpc.ggml_backend_rpc_start_server.restype = None

    def cpu_device(self) -> int:
        dev = self.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
        if not dev:
            raise RuntimeError("ggml has no CPU device")
        return dev

    def serve_rpc(self, endpoint: str, threads: int, cache_dir: str | None = None) -> None:
        """Runs ggml's RPC server on the CPU device. Blocks forever (the GIL is released)."""
        devices = (ctypes.c_void_p * 1)(self.cpu_device())
        self.rpc.ggml_backend_rpc_start_server(
            endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices)

    def add_rpc_server(self, endpoint: str) -> int:
        """Registers the devices of one RPC server with the registry llama.cpp reads.

        Connects at once (ggml aborts the process if it cannot): probe the server first.
        Returns how many devices it added.
        """
        reg = self.ggml.ggml_backend_reg_by_name(b"RPC")
        if not reg:
            raise RuntimeError("this llama.cpp build has no RPC backend (GGML_RPC=OFF)")
        addr = self.base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
        if not addr:
            raise RuntimeError("the RPC backend does not export ggml_backend_rpc_add_server")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
        server_reg = add_server(endpoint.encode())
        if not server_reg:
            raise RuntimeError(f"the RPC server at {endpoint} offers no device")
        self.ggml.ggml_backend_register(server_reg)
        return int(self.base.ggml_backend_reg_dev_count(server_reg))


@functools.cache
def ggml() -> Ggml:
    return Ggml()
