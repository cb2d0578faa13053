"""``lofit serve``: load the base model and the adapters of a folder, then run the HTTP server (uvicorn)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from lofit.methods.lofit.adapter_io import AdapterError
from lofit.models.loading import load_model
from lofit.serving.adapters import AdapterRegistry, discover
from lofit.serving.app import ServerLimits, create_app
from lofit.serving.engine import Engine

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOG = logging.getLogger("lofit.serving")


def check_binding(host: str, api_key: str | None) -> None:
    """ValueError when the server would listen beyond this machine without an API key."""
    if api_key is None and host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"refusing to listen on {host} without an API key: give --api-key (or LOFIT_API_KEY), "
            "or keep the default --host 127.0.0.1"
        )


def load_folder(registry: AdapterRegistry, adapters_dir: Path) -> list[str]:
    """Add every subfolder of ``adapters_dir`` holding a lofit result, named by the subfolder;
    each one refused is reported on stderr with its reason and skipped. The names added."""
    added = []
    for name, folder in discover(adapters_dir):
        if folder is None:
            print(f"lofit serve: skipped {name}: it holds no result saved by lofit", file=sys.stderr)
            continue
        try:
            registry.add(name, folder, name)
            added.append(name)
        except (AdapterError, FileNotFoundError, ValueError) as error:  # AdapterError covers a mismatch
            print(f"lofit serve: skipped {name}: {error}", file=sys.stderr)
    return added


def serve(
    model: str = "default",
    adapters_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Serve ``model`` with the adapters of ``adapters_dir`` until SIGINT or SIGTERM; then
    finish the requests in flight (at most the request timeout plus 10 s) and return."""
    check_binding(host, api_key)
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise FileNotFoundError(f"--adapters {adapters_dir} is not a folder")
    if max_batch < 1 or max_queue < 1:
        raise ValueError(f"--max-batch and --max-queue must be >= 1; got {max_batch} and {max_queue}")
    limits = limits or ServerLimits()
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    registry = AdapterRegistry(base, adapters_dir)
    added = load_folder(registry, adapters_dir) if adapters_dir is not None else []
    engine = Engine(registry, tokenizer, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, limits, api_key)
    print(
        f"lofit serve: {registry.base_name} with {len(added)} adapters ({', '.join(added) or 'none'}) "
        f"on http://{host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(limits.request_timeout) + 10,
    )
