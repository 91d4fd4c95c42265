"""The `prefix-serve` command."""

from __future__ import annotations

import argparse
import logging
import sys

from server.config import DTYPES, Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    try:
        settings = Settings(
            model=args.model, store_dir=args.store_dir, dtype=args.dtype, device=args.device,
            max_batch_size=args.max_batch_size, kv_cache_bytes=args.kv_cache_bytes, cache_bytes=args.cache_bytes,
            max_upload_bytes=args.max_upload_bytes, threads=args.threads,
        )
    except ValueError as exc:
        print(f"prefix-serve: {exc}", file=sys.stderr)
        return 2
    # A bounded graceful shutdown: open requests get a moment to finish, then the engine stops.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from server.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = Settings()

    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=defaults.model,
                       help="'default' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    serve.add_argument("--store-dir", default=str(defaults.store_dir), help="where uploaded tasks are kept")
    serve.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES))
    serve.add_argument("--device", default=defaults.device, help="cpu or cuda")
    serve.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    serve.add_argument("--kv-cache-bytes", type=int, default=defaults.kv_cache_bytes)
    serve.add_argument("--cache-bytes", type=int, default=defaults.cache_bytes,
                       help="memory budget for resident prefixes")
    serve.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes)
    serve.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (0: one per core)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="measure decode throughput (mixed vs single task, batched vs serial)")
    bench.add_argument("--model", default="default")
    bench.add_argument("--requests", type=int, default=16)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--virtual-tokens", type=int, default=16)
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--json", default="", help="also write the figures as JSON to this file")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
