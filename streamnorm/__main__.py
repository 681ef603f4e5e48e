"""Command line: ``python -m streamnorm {demo,bench,bench-dask,bench-gpu}``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m streamnorm {demo,bench,bench-dask,bench-gpu} [options]   (python -m streamnorm demo --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from ._demo import main as demo

        return demo(rest)
    if cmd == "bench-dask":
        from ._bench_dask import main as bench_dask

        return bench_dask(rest)
    if cmd == "bench-gpu":
        from ._bench_gpu import main as bench_gpu

        return bench_gpu(rest)
    if cmd == "bench":
        from ._bench import main as bench

        return bench(rest)
    print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
