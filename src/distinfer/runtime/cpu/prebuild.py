"""`python -m distinfer.runtime.cpu.prebuild`: compile the C++ ops of CPU runs ahead of the first run (distinfer's
decode ops and DeepSpeed's CPU all-reduce), into the op cache the ranks use (runtime/extensions.py), so that
the first run on a fresh installation does not spend about a minute compiling. Ranks that start meanwhile wait
for the build's turn and then load what it built. Exit status 0 even where an op cannot be built (the ranks
then say why, and run without it)."""

from __future__ import annotations

import os


def main() -> None:
    from distinfer.runtime.extensions import extensions_dir

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_SIZE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    from distinfer.runtime.cpu.cpp_ops import decode_ops

    print("distinfer decode ops:", "built" if decode_ops() is not None else "not available", flush=True)
    try:
        from distinfer.runtime.tensor import build_shm_op_once

        build_shm_op_once()
        print("DeepSpeed CPU all-reduce: built", flush=True)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed absent or its op unbuildable: the ranks report it
        print(f"DeepSpeed CPU all-reduce: not built ({type(exc).__name__}: {exc})", flush=True)


if __name__ == "__main__":
    main()
