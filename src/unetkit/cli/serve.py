"""`unetkit serve`: the local web page (segment, correct + fine-tune, generate)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from pathlib import Path

from unetkit.cli import flags as F
from unetkit.errors import ConfigError
from unetkit.outputs import output_folder
from unetkit.web.models import ModelList

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the local web page",
        description="Serve a web page on this computer to segment images, correct the "
        "masks and fine-tune on them, and generate images, with the given run folders or "
        "checkpoints (and any found in --models-dir). Needs the `web` extra.",
    )
    p.add_argument(
        "models", nargs="*", metavar="RUN_OR_CHECKPOINT", help="run folders or model files"
    )
    p.add_argument("--port", type=F.int_at_least(1, 65535), default=8000, help="port (8000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1: this computer only; 0.0.0.0 exposes the page, "
        "without any login, to the whole network)",
    )
    p.add_argument("--models-dir", help="folder searched for run folders and checkpoints")
    p.add_argument(
        "--max-upload-mb", type=F.positive_float, default=64.0, help="largest upload (64 MiB)"
    )
    p.add_argument("--workers", type=F.positive_int, default=1, help="jobs running at once (1)")
    p.add_argument("--work-dir", help="folder for uploads and results (default: a temp folder)")
    p.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this computer."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """ConfigError (one line) when ``host``:``port`` cannot be listened on: a name that does
    not resolve, an address of another computer, a port in use or below 1024 without rights.

    uvicorn would log its own error and ``sys.exit(1)`` instead; a probe bind (with
    uvicorn's SO_REUSEADDR) finds the same faults first.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"--host {host}: not an address of this computer ({reason})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                "choose a free --port (or an address of this computer)"
            ) from None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from unetkit.web.app import create_app  # why: optional dependency (fastapi: web extra)
    except ImportError as e:
        raise ConfigError(
            f"serve: needs the web extra ({e.name} is missing); pip install 'unetkit[web]'"
        ) from None

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected 1..65535")
    if args.max_upload_mb <= 0 or args.workers < 1:
        raise ConfigError("--max-upload-mb must be > 0 and --workers >= 1")
    if args.work_dir:
        output_folder(args.work_dir, flag="--work-dir", inputs=[*args.models, args.models_dir])
    models = ModelList(
        [Path(m) for m in args.models], Path(args.models_dir) if args.models_dir else None
    )
    check_address(args.host, args.port)
    if not models.list():
        log.warning("no models: give run folders or checkpoints, or --models-dir")
    local = is_loopback(args.host)
    if not local:
        log.warning(
            "WARNING: --host %s makes the page reachable from other computers, with no login "
            "and no encryption; anyone who can reach port %d can run jobs and read results",
            args.host,
            args.port,
        )
    app = create_app(
        models,
        work_dir=args.work_dir,
        max_upload_mb=args.max_upload_mb,
        workers=args.workers,
        allowed_hosts=LOOPBACK_HOSTS if local else None,
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"unetkit serve: open http://{shown}:{args.port}/ (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
