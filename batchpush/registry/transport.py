"""The HTTP session every registry client uses, and the proxies it goes through.

requests re-reads the environment on every request when ``trust_env`` is on: the
proxy variables, ``~/.netrc`` (credentials we must never send unasked) and
``REQUESTS_CA_BUNDLE`` (which would override a host's trust). That costs about half
of a small request's CPU. Our sessions turn it off; the proxy variables are read
once per origin instead, with the same rules (``NO_PROXY`` included), and the CA
bundle is always passed explicitly. ``send`` hands a request we prepare ourselves
straight to the session's adapter (its pools, TLS and proxies): a registry request
needs none of what ``Session.request`` adds around it (cookies, hooks, redirects,
which the client follows itself).
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies


def new_session(user_agent: str, pool_maxsize: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def proxies_for(url: str) -> dict[str, str]:
    """The proxies the environment names for ``url`` (empty: connect directly)."""
    parts = urlsplit(url)
    return _origin_proxies(parts.scheme, parts.netloc)


@functools.lru_cache(maxsize=64)
def _origin_proxies(scheme: str, netloc: str) -> dict[str, str]:
    return get_environ_proxies(f"{scheme}://{netloc}/")


def send(session: requests.Session, method: str, url: str, headers: dict[str, str], body: Any, *, timeout: tuple[float, float], verify: bool | str | None) -> requests.Response:
    """One request, streamed, never redirected. ``url`` is already quoted (built
    with ``quote`` or taken from the registry's Location); ``body`` is None, bytes,
    a sized iterable of bytes (sent with its Content-Length), or an iterable without
    a size (sent chunked: a stream whose length is known only at its end)."""
    request = requests.PreparedRequest()
    request.method = method
    request.url = url
    request.headers = CaseInsensitiveDict({**session.headers, **headers})  # type: ignore[arg-type]
    request.body = body
    request.hooks = {"response": []}
    if body is not None and not hasattr(body, "__len__"):
        request.headers["Transfer-Encoding"] = "chunked"
    elif body is not None:
        request.headers["Content-Length"] = str(len(body))
    elif method not in ("GET", "HEAD"):
        request.headers["Content-Length"] = "0"
    return session.get_adapter(url).send(request, stream=True, timeout=timeout, verify=True if verify is None else verify, proxies=proxies_for(url))
