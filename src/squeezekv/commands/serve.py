"""``squeezekv serve``: arguments, and building the store, engine and app from them (uvicorn runs the app)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spec import CacheSpec
from .cache_args import HelpFormatter, add_cache_arguments, cache_spec, given

if TYPE_CHECKING:
    from ..store import Tier

#: environment variable with API keys, comma-separated
KEYS_ENV = "SQUEEZEKV_API_KEYS"


def _slots(text: str) -> int | str:
    """``--runtime-slots``: an integer >= 0 or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0 or 'auto'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is out of range: an integer >= 0 (0: no runtime) or 'auto'")
    return n


def add_arguments(p: Any) -> None:
    """The ``squeezekv serve`` arguments, added to its (sub-command) parser ``p``."""
    p.description = (
        "Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. Each finished "
        "request's KV is saved (asynchronously) into a hierarchy of tiers, keyed by a hash chain over its tokens, and "
        "reused by any later prompt that shares the prefix (CachedAttention, arXiv 2403.19708). Needs the 'serve' "
        "extra: pip install -e '.[serve]'."
    )
    p.formatter_class = HelpFormatter
    p.add_argument("--model", default="default", help="local checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder's name)")
    add_cache_arguments(p, defaults_note=". Without any cache argument each conversation keeps the full cache; "
                        "with --channel/--crosslayer alone nothing is evicted (method none, budget 1.0)")
    p.add_argument("--gpu-cache", default="8GiB", help="GPU tier capacity (used when --device is CUDA)")
    p.add_argument("--cpu-cache", default="32GiB", help="host-memory tier capacity")
    p.add_argument("--disk-cache", default=None, metavar="DIR:SIZE", help="disk tier, e.g. /var/kv:200GiB")
    p.add_argument("--block", type=int, default=16, help="tokens per hashed block")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-active", type=int, default=8, help="requests running at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (more: HTTP 429)")
    p.add_argument("--runtime-slots", type=_slots, default=0, metavar="N|auto",
                   help="decode the running requests together in the decode runtime's KV pool of N slots (one "
                        "batched step, CUDA graphs on the GPU; the full cache or a plain --cache; default 0: off); "
                        "'auto': as many slots as the device's free memory holds, less --runtime-reserve; with the "
                        "full cache and --prefill-chunk N, new prompts prefill in their slots, N tokens inside each "
                        "decode step")
    p.add_argument("--runtime-reserve", type=float, default=4.0, metavar="GIB",
                   help="GiB left free by --runtime-slots auto (activations, CUDA graphs)")
    p.add_argument("--runtime-compile", action="store_true",
                   help="compile the runtime's step with torch.compile (faster steps; each batch bucket compiles "
                        "once, about a minute for an 8B model on an H200)")
    p.add_argument("--runtime-slot-tokens", type=int, default=4096, metavar="T",
                   help="tokens a layer of a runtime slot holds (kept prompt tokens plus the decode chunk, or plus "
                        "max_tokens for a policy that does not evict while decoding); larger requests decode alone")
    p.add_argument("--prefill-budget", type=int, default=None, metavar="T",
                   help="prompt tokens fed per engine iteration over all new requests while others decode "
                        "(default: one --prefill-chunk; no limit without chunked prefill)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--truncation", default="error", choices=["error", "rerotate"],
                   help="prompts longer than the context: reject, or drop the oldest tokens and re-rotate stored keys")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (repeatable; also "
                        f"--api-key-file and ${KEYS_ENV}, comma-separated). Default: no authentication")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="API keys, one per line")
    p.add_argument("--cache-scope", default="user", choices=["user", "global"],
                   help="user: each API key's (without keys: each 'user' field's) KV is kept apart; global: "
                        "prefixes are shared between all clients, who can then tell what others sent")
    p.add_argument("--max-connections", type=int, default=512,
                   help="concurrent connections and requests at most (more: HTTP 503)")
    p.add_argument("--keep-alive-timeout", type=int, default=5, help="seconds an idle connection is kept")
    p.add_argument("--header-timeout", type=int, default=10,
                   help="seconds a connection may take to send a request's headers (slow or half-open clients are "
                        "closed, so they cannot hold every connection slot)")
    p.add_argument("--shutdown-timeout", type=int, default=10,
                   help="seconds SIGTERM waits for running requests before cancelling them (a second signal: now)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def api_keys(keys: list[str] | None, key_file: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """Every API key from ``--api-key``, ``--api-key-file`` (one per line, ``#`` comments) and ``$SQUEEZEKV_API_KEYS``
    (comma-separated)."""
    environ = os.environ if environ is None else environ
    out = [k.strip() for k in keys or []]
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-key-file {key_file!r} cannot be read: {err}") from None
        out += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    out += [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if any(not k for k in out):
        raise ValueError("--api-key: a key is empty")
    return out


def build_tiers(gpu: str, cpu: str, disk: str | None, device: str) -> list[Tier]:
    """Tiers from the command line: a GPU tier only on a CUDA device, a host tier, an optional disk tier."""
    from ..store import DiskTier, FolderInUse, MemoryTier, parse_bytes  # torch: imported when the server starts

    tiers: list[Tier] = []
    if device.startswith("cuda"):
        tiers.append(MemoryTier("gpu", parse_bytes(gpu), device))
    tiers.append(MemoryTier("cpu", parse_bytes(cpu), "cpu"))
    if disk:
        folder, sep, size = disk.rpartition(":")
        if not sep or not folder:
            raise ValueError(f"--disk-cache {disk!r} must look like DIR:SIZE, e.g. /var/kv:200GiB")
        try:
            tiers.append(DiskTier(Path(folder), parse_bytes(size)))
        except FolderInUse as err:
            raise ValueError(str(err)) from None
    return tiers


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server where a second SIGTERM (not only a second SIGINT) stops at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM):
                self.force_exit = True
            super().handle_exit(sig, frame)

    return Server


def _protocol(header_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's headers: from the connection's start
    and after each response, a connection that has not sent complete headers within ``header_timeout`` seconds is
    closed (uvicorn's keep-alive timer starts only after a first response, and any byte resets it)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting_since = self.cycle  # a new request replaces the cycle
            self._header_deadline = self.loop.call_later(header_timeout, self._header_deadline_passed, waiting_since)

        def _header_deadline_passed(self, waiting_since: Any) -> None:
            if self.cycle is waiting_since and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_deadline.cancel()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

    return Protocol


def uvicorn_config(app: Any, host: str, port: int, *, max_connections: int = 512, keep_alive_timeout: int = 5,
                   header_timeout: int = 10, shutdown_timeout: int = 10, log_level: str = "info") -> Any:
    """uvicorn's settings for the server: bounded connections (more: 503), idle, header and shutdown timeouts,
    headers of at most 64 KiB (more: 400)."""
    import uvicorn

    for name, v in (("max_connections", max_connections), ("keep_alive_timeout", keep_alive_timeout),
                    ("header_timeout", header_timeout), ("shutdown_timeout", shutdown_timeout)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v!r} is out of range: must be an integer >= 1")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                          timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=shutdown_timeout,
                          h11_max_incomplete_event_size=64 << 10, http=_protocol(header_timeout))


def serve_forever(config: Any) -> None:
    """Run uvicorn with :func:`uvicorn_config`'s config until SIGTERM/SIGINT."""
    _server_class()(config).run()


def server_cache_spec(args: argparse.Namespace) -> CacheSpec | None:
    """The conversations' cache: None (the full cache) without any cache argument; with only a channel or cross-layer
    method, that method over every token (method ``none``, budget 1.0); else the spec of ``--cache`` and the flags."""
    fields = given(args)
    if not fields - {"evict_every", "prefill_chunk"}:
        return None
    base = None if fields & {"method", "budget", "allocation", "method_params", "allocation_params"} else \
        CacheSpec(method="none", budget=1.0)
    return cache_spec(args, base=base)


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - only to report a missing extra before loading the model
    except ImportError:
        print("squeezekv: error: serve needs FastAPI and uvicorn: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import torch

    from ..assets import load_model, resolve_model
    from ..serve import Engine, EngineConfig, create_app

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = server_cache_spec(args)
    if spec is not None:
        spec.validate()  # bad names and parameters fail before the model loads
    keys = api_keys(args.api_key, args.api_key_file)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"squeezekv serve: warning: listening on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    tiers = build_tiers(args.gpu_cache, args.cpu_cache, args.disk_cache, device)
    path = resolve_model(args.model)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    name = args.served_model_name or Path(path).name
    config = EngineConfig(model_name=name, cache=spec, device=device,
                          max_active=args.max_active, max_queue=args.max_queue, max_new_tokens=args.max_tokens,
                          truncation=args.truncation, runtime_slots=args.runtime_slots,
                          runtime_slot_tokens=args.runtime_slot_tokens, runtime_compile=args.runtime_compile,
                          runtime_reserve_gib=args.runtime_reserve,
                          prefill_chunk=args.prefill_chunk if spec is None else None,
                          prefill_budget=args.prefill_budget)
    config.validate()
    from ..store import KVStore, namespace

    root = namespace(model=str(path), dtype=str(next(model.parameters()).dtype),
                     cache=None if spec is None else spec.to_text())
    store = KVStore(tiers, root, block=args.block)
    engine = Engine(model, tokenizer, store, config)
    shortest, why = engine.shortest_prompt()
    if shortest is None:
        print(f"squeezekv serve: warning: the cache {spec.to_text()!r} cannot prefill any prompt "
              f"up to 4096 tokens ({why}); such requests are answered HTTP 400", file=sys.stderr)
    elif shortest > 1:
        print(f"squeezekv serve: warning: with the cache {spec.to_text()!r}, prompts shorter "
              f"than about {shortest} tokens are answered HTTP 400 ({why})", file=sys.stderr)
    engine.start()
    print(f"squeezekv serve: {name} on {device}, cache " + ("full" if spec is None else repr(spec.to_text()))
          + ", tiers "
          + ", ".join(f"{t.name} {t.capacity / 2**30:.1f} GiB" for t in tiers)
          + f", cache scope {args.cache_scope}, " + (f"{len(keys)} API key(s)" if keys else "no API key"),
          file=sys.stderr)
    serve_forever(uvicorn_config(create_app(engine, api_keys=keys, cache_scope=args.cache_scope), args.host,
                                 args.port, max_connections=args.max_connections,
                                 keep_alive_timeout=args.keep_alive_timeout, header_timeout=args.header_timeout,
                                 shutdown_timeout=args.shutdown_timeout))
    return 0


__all__ = ["add_arguments", "build_tiers", "main", "server_cache_spec", "api_keys", "uvicorn_config", "serve_forever",
           "KEYS_ENV"]
