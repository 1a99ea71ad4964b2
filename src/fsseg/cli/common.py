"""Helpers shared by the command-line entry points: config discovery, environment defaults, run records."""

from __future__ import annotations

import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from fsseg.errors import ConfigError
from fsseg.resolvers import register_resolvers

register_resolvers()


def config_dir() -> str:
    """The conf/ directory: $FSSEG_CONF, else ./conf, else the repository's conf/ next to src/ (editable install)."""
    candidates = [os.environ.get("FSSEG_CONF"), str(Path.cwd() / "conf"), str(Path(__file__).resolve().parents[3] / "conf")]
    for c in candidates:
        if c and (Path(c) / "train.yaml").is_file():
            return str(Path(c).resolve())
    raise ConfigError(
        "cannot find fsseg's conf/ directory (looked at $FSSEG_CONF, ./conf and the source checkout); "
        "run from the repository root or set FSSEG_CONF"
    )


def environment_defaults(probe_timeout: float = 3.0) -> str:
    """Offline-safe defaults, applied by every CLI before any work: no albumentations update check; wandb
    offline unless a key is configured (WANDB_API_KEY or a ~/.netrc entry for the wandb host) AND the host
    answers within ``probe_timeout`` s, so a run never waits on wandb's own retries (~90 s) when the network is
    down. An explicit WANDB_MODE is left alone. Returns the wandb mode runs will use."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    host, port = wandb_endpoint()
    if not wandb_key_configured(host):
        os.environ["WANDB_MODE"] = "offline"
        return "offline"
    try:
        with socket.create_connection(proxy_endpoint() or (host, port), timeout=probe_timeout):
            return "online"
    except OSError as exc:
        os.environ["WANDB_MODE"] = "offline"
        print(f"fsseg: wandb host {host}:{port} unreachable ({exc}); logging offline "
              "(upload later: wandb sync <run dir>/wandb/offline-run-*)", file=sys.stderr, flush=True)  # fmt: skip
        return "offline"


def _endpoint(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def wandb_endpoint() -> tuple[str, int]:
    """(host, port) of the wandb server: WANDB_BASE_URL or api.wandb.ai:443."""
    return _endpoint(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


def proxy_endpoint() -> tuple[str, int] | None:
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    return _endpoint(url) if url else None


def wandb_key_configured(host: str = "api.wandb.ai") -> bool:
    """A wandb API key is available: WANDB_API_KEY, or `wandb login`'s ~/.netrc (or $NETRC) entry for host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def instantiate(node, **kwargs):
    """hydra.utils.instantiate that re-raises fsseg's own input errors unwrapped, so the message a user sees is
    the one naming the option or file (Hydra wraps constructor errors in InstantiationException)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from fsseg.errors import FsSegError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, FsSegError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
