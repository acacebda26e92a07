"""``xw login --oidc``: log in through an OpenID Connect issuer with the device authorization grant (RFC 8628).

The command line has no browser, so it asks the issuer for a device code, shows the person a URL and a short
user code to enter there (on any device), and polls the issuer's token endpoint until the person approved.

Which token is stored in the client config (``token = "…"``): the server checks every bearer JWT's ``aud``
against the ``audience`` it is configured with (advertised by ``GET /api/v1/auth/oidc``), so

* the **access token**, when it is a JWT whose ``aud`` contains that audience (an issuer configured to issue
  RFC 9068 JWT access tokens for the xwhep resource: the usual set-up, ``audience = "xwhep"``);
* else the **ID token**, whose ``aud`` is the client id (the server is then configured with
  ``audience = <client_id>``);
* else nothing: the login fails and says how to configure the issuer, rather than storing a token the server
  would refuse.

The tokens are only *looked at* here (unverified) to make that choice: the server verifies signature, issuer,
audience and lifetime. No token is ever made on this side.

HTTP is plain httpx: Authlib's OAuth 2.0 clients have no device-authorization call (only the token request),
and RFC 8628's two form POSTs are short enough to follow to the letter here, with no extra dependency.
"""

from __future__ import annotations

import os
import re
import ssl
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from xwhep.client.config import ConfigError, load
from xwhep.client.sdk import XwError
from xwhep.fsutil import write_atomic

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPE = "openid email profile"
DEFAULT_INTERVAL = 5  # RFC 8628 §3.2: when the issuer gives none
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5: each slow_down adds 5 seconds, for good

Prompt = Callable[[str], object]


class OidcLoginError(XwError):
    """The device login gave no usable token (an :class:`XwError`: the CLI reports it like any refusal)."""


def _verify(ca: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else True


def _http(ca: str | None, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(verify=_verify(ca), timeout=httpx.Timeout(timeout, connect=15.0), follow_redirects=False)


def _json(r: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = r.json()
    except ValueError:
        raise OidcLoginError(f"{what}: HTTP {r.status_code}, not JSON") from None
    if not isinstance(data, dict):
        raise OidcLoginError(f"{what}: HTTP {r.status_code}, not a JSON object")
    return data


def discover(http: httpx.Client, issuer: str) -> dict[str, Any]:
    """The issuer's OpenID Connect discovery document (its ``issuer`` must be the one asked for)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        r = http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise OidcLoginError(f"cannot reach the issuer {issuer}: {exc}") from None
    if r.status_code != 200:
        raise OidcLoginError(f"{url}: HTTP {r.status_code}")
    doc = _json(r, url)
    if str(doc.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise OidcLoginError(f"{url} names issuer {doc.get('issuer')!r}, not {issuer!r}")
    return doc


def device_login(issuer: str, client_id: str, scope: str = DEFAULT_SCOPE, ca: str | None = None,
                 prompt: Prompt = print, *, sleep: Callable[[float], object] = time.sleep,
                 http_timeout: float = 30.0) -> dict[str, Any]:
    """Run the device authorization grant against ``issuer`` for the public client ``client_id``.

    Shows the verification URI and user code through ``prompt``, then polls the token endpoint at the pace
    the issuer asks for (``interval``, ``slow_down``) until it answers with tokens, refuses (``access_denied``),
    or the device code expires. Returns the token response (``access_token``, ``id_token``, ``expires_in``…).
    ``ca`` trusts a private CA for the issuer's TLS. Raises :class:`OidcLoginError`.
    """
    with _http(ca, http_timeout) as http:
        doc = discover(http, issuer)
        device_ep, token_ep = doc.get("device_authorization_endpoint"), doc.get("token_endpoint")
        if not isinstance(device_ep, str) or not isinstance(token_ep, str):
            raise OidcLoginError(f"the issuer {issuer} does not offer the device authorization grant "
                                 "(no device_authorization_endpoint in its discovery document)")
        try:
            r = http.post(device_ep, data={"client_id": client_id, "scope": scope},
                          headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OidcLoginError(f"device authorization request to {device_ep} failed: {exc}") from None
        grant = _json(r, device_ep)
        if r.status_code != 200:
            raise OidcLoginError(f"the issuer refused the device authorization: {_oauth_error(grant)}")
        device_code, user_code = grant.get("device_code"), grant.get("user_code")
        # "verification_url" is what some early implementations (Google) send instead
        uri = grant.get("verification_uri") or grant.get("verification_url")
        if not (isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)):
            raise OidcLoginError(f"{device_ep}: the answer lacks device_code, user_code or verification_uri")
        interval = float(grant.get("interval") or DEFAULT_INTERVAL)
        expires_in = float(grant.get("expires_in") or 600)
        complete = grant.get("verification_uri_complete")
        message = f"To log in, open {uri} and enter the code {user_code}"
        if isinstance(complete, str):
            message += f" (or open {complete})"
        prompt(message + f"; waiting up to {int(expires_in)} s.")
        deadline = time.monotonic() + expires_in
        while True:
            sleep(interval)
            if time.monotonic() > deadline:
                raise OidcLoginError("the user code expired before the login was approved")
            try:
                r = http.post(token_ep, data={"grant_type": DEVICE_GRANT, "device_code": device_code,
                                              "client_id": client_id}, headers={"Accept": "application/json"})
            except httpx.TimeoutException:
                interval *= 2  # RFC 8628 §3.5: back off on connection timeouts
                continue
            except httpx.HTTPError as exc:
                raise OidcLoginError(f"token request to {token_ep} failed: {exc}") from None
            answer = _json(r, token_ep)
            if r.status_code == 200:
                if not isinstance(answer.get("access_token"), str):
                    raise OidcLoginError(f"{token_ep}: the token response has no access_token")
                return answer
            error = answer.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if error == "access_denied":
                raise OidcLoginError("the login was denied at the issuer")
            if error == "expired_token":
                raise OidcLoginError("the user code expired before the login was approved")
            raise OidcLoginError(f"the issuer refused the token request: {_oauth_error(answer)}")


def _oauth_error(answer: dict[str, Any]) -> str:
    error = answer.get("error") or "unknown error"
    desc = answer.get("error_description")
    return f"{error}: {desc}" if desc else str(error)


def _audiences(token: str) -> list[str] | None:
    """The ``aud`` of a JWT, read *unverified* (only to choose what to store), or None if not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def choose_token(response: dict[str, Any], audience: str | None) -> tuple[str, str]:
    """The token to store, and its kind (``access_token`` or ``id_token``); see the module docstring."""
    access, id_token = response.get("access_token"), response.get("id_token")
    access_aud = _audiences(access) if isinstance(access, str) else None
    id_aud = _audiences(id_token) if isinstance(id_token, str) else None
    if audience is None:
        # nothing to match: a JWT access token is meant for resource servers, an ID token for the client
        if access_aud is not None:
            return str(access), "access_token"
        if id_aud is not None:
            return str(id_token), "id_token"
    else:
        if access_aud is not None and audience in access_aud:
            return str(access), "access_token"
        if id_aud is not None and audience in id_aud:
            return str(id_token), "id_token"
    raise OidcLoginError(
        f"the issuer gave no JWT for audience {audience!r}: configure it to issue JWT access tokens for that "
        "audience, or configure the server's [[oidc]] audience as the client id (ID tokens carry it)")


_TOP_KEY = re.compile(r"^\s*token\s*=")


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def store_token(config_path: str | os.PathLike[str], token: str) -> Path:
    """Write ``token = "…"`` into the client config, keeping every other line; the file ends up mode 0600.

    The file is rewritten atomically (a crash leaves the old one) and checked to still be valid TOML.
    """
    path = Path(config_path).expanduser()
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    # top-level keys live before the first [table]; the token must be one of them
    end = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    entry = f"token = {_toml_str(token)}"
    at = next((i for i in range(end) if _TOP_KEY.match(lines[i])), None)
    if at is not None:
        lines[at] = entry
    else:
        lines.insert(end, entry)
    new = "\n".join(lines) + "\n"
    try:
        if tomllib.loads(new).get("token") != token:
            raise OidcLoginError(f"{path}: could not place the token among the config's keys")
    except tomllib.TOMLDecodeError as exc:
        raise OidcLoginError(f"{path}: not valid TOML, token not stored: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, new, 0o600)
    return path


def server_issuers(server: str, ca: str | None = None) -> list[dict[str, Any]]:
    """The issuers an xwhep server accepts (``GET /api/v1/auth/oidc``)."""
    verify: ssl.SSLContext | bool = False if server.startswith("http://") else _verify(ca)
    url = server.rstrip("/") + "/api/v1/auth/oidc"
    try:
        with httpx.Client(verify=verify, timeout=30.0) as http:
            r = http.get(url)
    except httpx.HTTPError as exc:
        raise OidcLoginError(f"cannot reach server {server}: {exc}") from None
    if r.status_code != 200:
        raise OidcLoginError(f"{url}: HTTP {r.status_code}")
    issuers = _json(r, url).get("issuers")
    return [i for i in issuers if isinstance(i, dict)] if isinstance(issuers, list) else []


def login_oidc(config_path: str | os.PathLike[str], issuer: str | None = None, client_id: str | None = None,
               prompt: Prompt = print, *, scope: str = DEFAULT_SCOPE, issuer_ca: str | None = None,
               sleep: Callable[[float], object] = time.sleep) -> dict[str, Any]:
    """Log in through OpenID Connect and store the token in the client config at ``config_path``.

    Issuer and client id default to what the server advertises (``GET /api/v1/auth/oidc``; with several
    issuers, ``issuer`` picks one). ``issuer_ca`` (else the config's ``oidc_ca``) trusts a private CA for the
    issuer's TLS. Returns ``{"issuer", "client_id", "token_kind", "expires_in", "config"}``.
    """
    cfg = load(config_path)
    if cfg.path is None:  # load() always sets it; keeps the type checker honest
        raise ConfigError("no client config path")
    audience: str | None = None
    advertised = server_issuers(cfg.server, cfg.ca)
    if issuer is not None:
        entry = next((i for i in advertised if str(i.get("issuer", "")).rstrip("/") == issuer.rstrip("/")), None)
    elif len(advertised) == 1:
        entry = advertised[0]
    elif not advertised:
        raise OidcLoginError(f"the server {cfg.server} accepts no OpenID Connect issuer")
    else:
        names = ", ".join(str(i.get("issuer")) for i in advertised)
        raise OidcLoginError(f"the server accepts several issuers; choose one: {names}")
    if entry is not None:
        issuer = issuer or str(entry["issuer"])
        audience = entry.get("audience")
        client_id = client_id or entry.get("client_id")
    if issuer is None:
        raise OidcLoginError("no issuer given")
    if not client_id:
        raise OidcLoginError(f"no client id for {issuer}: the server advertises none; give one")
    ca = issuer_ca or _config_path_value(cfg.path, cfg.extra.get("oidc_ca"))
    if urlsplit(issuer).scheme != "https" and urlsplit(issuer).hostname not in ("127.0.0.1", "::1", "localhost"):
        raise OidcLoginError(f"issuer {issuer}: https required")
    response = device_login(issuer, client_id, scope=scope, ca=ca, prompt=prompt, sleep=sleep)
    token, kind = choose_token(response, audience)
    store_token(cfg.path, token)
    return {"issuer": issuer, "client_id": client_id, "token_kind": kind,
            "expires_in": response.get("expires_in"), "config": str(cfg.path)}


def _config_path_value(config: Path, value: Any) -> str | None:
    if not value:
        return None
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else config.parent / p)
