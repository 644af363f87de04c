"""Is a service there: an HTTP endpoint that answers, a port that accepts, a path that can be written. The
few-second checks a stage (the MLflow store: `tracking.check`) or the flow (the Prefect API) makes before any work,
so that a server that is down costs seconds and one line, not a client's minutes of retries and a traceback.

Each returns None when the service is there, else the reason, in words, for a one-line error naming the setting.
"""
from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TIMEOUT_S = 5.0  # connect + answer: a healthy server on any network answers its health check well within this


def url_problem(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why URL is not a well-formed URL of one of SCHEMES with a host (and a numeric port, if any)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        return f"not a valid URL ({e})"
    if parsed.scheme not in schemes or not parsed.hostname:
        return f"not a valid URL (expected {' or '.join(f'{s}://host[:port]/...' for s in schemes)})"
    return None


def http_problem(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """Why GET URL (a health endpoint) does not answer within TIMEOUT seconds. A 404 means something else answers
    there (not the server: a wrong host, port or path) and a 5xx a server in trouble (a proxy whose server is gone
    answers 502 or 503); any other answer, authentication refused included, means the server is there."""
    if problem := url_problem(url):
        return problem
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return f"GET {url} answered 404 Not Found: not the server (a wrong host, port or path?)"
        return f"GET {url} answered {e.code} {e.reason}" if e.code >= 500 else None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer within {timeout:g} s"
        return f"not reachable (GET {url}: {reason})"


def port_problem(host: str, port: int, timeout: float = TIMEOUT_S) -> str | None:
    """Why HOST:PORT accepts no TCP connection within TIMEOUT seconds (a database server)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"not reachable ({host}:{port}: {e.strerror or e})"


def writable_problem(path: str | Path, parents: bool = True) -> str | None:
    """Why PATH (a file or folder, there or to be created) cannot be written: a file is made and removed in the
    folder that holds it (which, with PARENTS, may be made too: then its nearest existing ancestor), which also
    finds read-only filesystems, where permission bits alone (and root) would say yes."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    folder = path if path.is_dir() else next((p for p in path.parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return f"{folder or path} is not a folder"
    if not parents and folder != path and folder != path.parent:
        return f"{path.parent} does not exist"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
