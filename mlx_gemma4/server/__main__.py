"""`python -m mlx_gemma4.server` / `mlx_gemma4.server`: serve a model over OpenAI's HTTP API."""

import argparse
import sys
from pathlib import Path

from .. import BUNDLED_MODEL
from ..cli import add_kv_quant_arguments, kv_quant_from


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mlx_gemma4.server", description="OpenAI-compatible server for a Gemma 4 model.")
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder or hub id (default: bundled tiny model)")
    parser.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--allowed-media-dir", type=Path, help="folder whose files requests may name as media (off by default)")
    parser.add_argument("--max-active", type=int, default=8, help="requests generating at once (interleaved)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get a 503")
    parser.add_argument("--cached-sessions", type=int, default=4, help="conversations whose prompt caches are kept")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    add_kv_quant_arguments(parser)
    args = parser.parse_args(argv)
    if args.allowed_media_dir is not None and not args.allowed_media_dir.is_dir():
        parser.error(f"--allowed-media-dir {args.allowed_media_dir} is not a folder")
    try:
        kv_quant = kv_quant_from(args)  # bad bits fail before the model loads
        import uvicorn

        from ..api import load
        from .app import create_app
        from .media import MediaPolicy

        lm = load(args.model, name=args.model_name, progress=_progress, max_active=args.max_active,
                  max_queue=args.max_queue, cached_sessions=args.cached_sessions, kv_quant=kv_quant)
    except ImportError as error:
        print(f"mlx_gemma4.server: error: {error}; install the server extra: pip install 'mlx-gemma4[server]'", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"mlx_gemma4.server: error: {error}", file=sys.stderr)
        sys.exit(1)
    app = create_app(lm, api_key=args.api_key, request_timeout=args.request_timeout,
                     media=MediaPolicy(allowed_dir=args.allowed_media_dir, max_images=args.max_images))
    print(f"serving {lm.name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    lm.unload()


def _progress(fraction: float, stage: str):
    print(f"\r{stage}: {fraction:4.0%}", end="\n" if fraction >= 1 else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
