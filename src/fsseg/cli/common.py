"""Helpers shared by the command-line entry points: config discovery, environment defaults, run records."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from fsseg.errors import ConfigError
from fsseg.resolvers import register_resolvers

register_resolvers()


@contextlib.contextmanager
def report_errors(prog: str) -> Iterator[None]:
    """fsseg's own errors (ConfigError, DataError, WeightsError, OutputError, RunError) end the command with
    their message alone on stderr (exit status 1), not behind Hydra's traceback, and are recorded in the run's
    log file (train.log); HYDRA_FULL_ERROR=1 shows the full traceback instead."""
    from fsseg.errors import FsSegError

    try:
        yield
    except FsSegError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _to_log_files(logging.LogRecord("fsseg", logging.ERROR, __file__, 0, "%s", (str(err),), None))
        raise SystemExit(f"{prog}: error: {err}") from None
    except Exception as err:  # a bug: Hydra prints the traceback; the run's log keeps it too
        _to_log_files(logging.LogRecord("fsseg", logging.ERROR, __file__, 0, "%s", (repr(err),), sys.exc_info()))
        raise


def _to_log_files(record: logging.LogRecord) -> None:
    """Write a record to the log files only (train.log): the console gets the error from the caller."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


def single_log_lines() -> None:
    """Lightning gives its loggers their own console handler; under Hydra, whose root handlers (console and the
    run's log file) receive the same records, every Lightning line was printed twice. Drop Lightning's own."""
    import lightning.pytorch  # noqa: F401 - adds its handlers at import: import first, then remove them

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


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
