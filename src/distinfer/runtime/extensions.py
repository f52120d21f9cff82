"""Folders and locks that ranks share on one node: the cache of compiled ops, and the user's own lock files.

PyTorch compiles C++ ops at first use (`torch.utils.cpp_extension`): DeepSpeed's CPU all-reduce
(runtime/tensor.py) and, on CPU pipeline ranks, distinfer's own decode ops (runtime/cpu/cpp_ops.py). Both
build into `$DISTINFER_CACHE/torch_extensions/torch-VERSION-INSTALL` (a folder per PyTorch installation; or
the user's TORCH_EXTENSIONS_DIR) one rank at a time:
PyTorch guards each op's build directory with a `lock` file that a killed build leaves behind, and every
later build or load of that op then waits for it forever. The ranks of a node take turns under an flock,
which the kernel releases when its holder dies: whoever holds it knows that no build is running in
distinfer's own directory, so any `lock` file there is stale and goes. A directory the user chose may be
shared with other programs and is left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distinfer.models.tiny import cache_dir

log = logging.getLogger("distinfer.extensions")


def lock_dir() -> Path:
    """The user's own folder for lock files (never a shared temporary directory, where another user could
    plant a symlink at a predictable name): $DISTINFER_CACHE/locks, mode 0700."""
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (created 0600 if missing; a symlink there is refused, not followed); the kernel
    releases it if this process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def extensions_dir() -> Path:
    """Where distinfer keeps the ops it and DeepSpeed compile (unless the user set TORCH_EXTENSIONS_DIR): one folder
    per PyTorch installation, since a build's commands name the headers' folder and two environments sharing one
    build would each rebuild the other's at every first use."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("torch")
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    install = hashlib.sha1(f"{spec.origin if spec else '?'}:{version}".encode()).hexdigest()[:10]
    return cache_dir() / "torch_extensions" / f"torch-{version}-{install}"


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_dir())


@contextmanager
def build_turn() -> Iterator[Path]:
    """Hold this node's turn to build or load an op; yields the extensions directory."""
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / "distinfer-build.lock"):
        if root == extensions_dir():
            for path in remove_stale_build_locks(root):
                log.warning("removed %s, left by an op build that was killed", path)
        yield root


def remove_stale_build_locks(root: Path) -> list[Path]:
    """Remove the `lock` files that killed op builds left in `root`'s build directories; returns them.
    Only safe while no build can be running there (see `build_turn`)."""
    stale = sorted(root.glob("*/lock"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
