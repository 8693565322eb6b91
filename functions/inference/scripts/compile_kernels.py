"""Compiles csrc/kernels.cu with NVRTC for GPU architectures, as the CUDA build does at run time,
without a GPU: NVRTC is a compiler library (the PyPI torch wheel's nvidia/cu13/lib ships it).

    python compile_kernels.py KERNELS.cu --arch sm_80 --arch sm_90 --expect NAME...

Exits non-zero with NVRTC's log when the source does not compile for an architecture, or when an
expected kernel is missing from the compiled binary. Prints one line per architecture.
"""

import argparse
import ctypes
import glob
import os
import sys

# The options csrc/cuda_graph.cpp passes (keep in step).
OPTIONS = ["--std=c++17"]


def load_nvrtc():
    for site in sys.path:
        for lib in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.*"))):
            if ".alt." in lib:
                continue
            folder = os.path.dirname(lib)
            # libnvrtc dlopens its builtins by name: load them first from the same folder.
            for builtins in glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(lib)
    sys.exit("no libnvrtc.so.* under any nvidia/*/lib of sys.path (is torch installed?)")


def check(nvrtc, code, rc):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{code}: {nvrtc.nvrtcGetErrorString(rc).decode()}")


def compile_for(nvrtc, source, name, arch):
    program = ctypes.c_void_p()
    check(nvrtc, "nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(
        ctypes.byref(program), source, name.encode(), 0, None, None))
    options = [o.encode() for o in OPTIONS + [f"--gpu-architecture={arch}"]]
    argv = (ctypes.c_char_p * len(options))(*options)
    try:
        rc = nvrtc.nvrtcCompileProgram(program, len(options), argv)
        size = ctypes.c_size_t()
        check(nvrtc, "nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        check(nvrtc, "nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog(program, log))
        if rc != 0:
            sys.exit(f"{name} does not compile for {arch}:\n{log.value.decode(errors='replace')}")
        check(nvrtc, "nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc, "nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(program, cubin))
        return cubin.raw, log.value.decode(errors="replace").strip()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--arch", action="append", required=True)
    parser.add_argument("--expect", nargs="*", default=[])
    args = parser.parse_args()
    with open(args.source, "rb") as f:
        source = f.read()
    nvrtc = load_nvrtc()
    for arch in args.arch:
        cubin, log = compile_for(nvrtc, source, os.path.basename(args.source), arch)
        missing = [k for k in args.expect if k.encode() + b"\0" not in cubin]
        if missing:
            sys.exit(f"{arch}: kernels missing from the binary: {', '.join(missing)}")
        warnings = f"; warnings:\n{log}" if log else ""
        print(f"{arch}: {len(cubin)} bytes, {len(args.expect)} expected kernels present{warnings}")


if __name__ == "__main__":
    main()
