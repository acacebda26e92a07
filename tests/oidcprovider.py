"""A standards-compliant OpenID Connect provider on loopback, for tests: Authlib's OAuth 2.0 server, over HTTPS.

What it offers, each from Authlib rather than written here:

* discovery (``/.well-known/openid-configuration``, checked with ``authlib.oidc.discovery``) and a JWKS;
* the device authorization grant (RFC 8628: ``authlib.oauth2.rfc8628``) at ``/device_authorization`` and
  ``/token``; its token responses carry an ID token (``authlib.oidc.core`` ``OpenIDToken`` extension) and,
  for clients registered with an ``access_audience``, an RFC 9068 JWT access token
  (``authlib.oauth2.rfc9068``) for that audience; other clients get opaque access tokens;
* the person's step, done the way a browser would: ``GET /device?user_code=…`` shows the form,
  ``POST /device/approve`` with ``user_code``, ``username`` and optionally ``approve=false`` (to deny).

Test helpers mint tokens signed with the provider's key (or another one) through joserfc, Authlib's own JOSE
implementation: :meth:`OidcProvider.mint` with any ``aud``/``iss``/lifetime, :meth:`OidcProvider.rotate_key`.

The HTTP server is uvicorn in a thread with a certificate from a throw-away CA (``provider.ca``), so issuer
URLs are ``https://127.0.0.1:PORT`` as real ones are https.
"""

from __future__ import annotations

import html
import json
import secrets
import socket
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from authlib.common.security import generate_token
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, JsonRequest, OAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc8628 import DeviceAuthorizationEndpoint, DeviceCodeGrant, DeviceCredentialDict
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDToken
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from xwhep.server.pki import create_ca, issue_server_cert

SigningKey = RSAKey | ECKey | OctKey


@dataclass
class ProviderUser:
    """A person with an account at the provider."""

    username: str
    sub: str
    email: str | None = None
    email_verified: bool = True
    name: str | None = None

    def get_user_id(self) -> str:
        return self.sub

    def claims(self, scope: str) -> dict[str, Any]:
        info = UserInfo(sub=self.sub, preferred_username=self.username, name=self.name or self.username)
        if self.email:
            info["email"], info["email_verified"] = self.email, self.email_verified
        return {"sub": self.sub, **info.filter(scope)}


@dataclass
class ProviderClient(ClientMixin):
    """A registered public client (no secret: a command line cannot keep one)."""

    client_id: str
    access_audience: str | None = None  # JWT access tokens for this audience; None: opaque access tokens
    scope: str = "openid email profile"
    grant_types: tuple[str, ...] = (DeviceCodeGrant.GRANT_TYPE,)

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return self.scope
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


# -- Authlib on Starlette: the request/response adapters Authlib's framework integrations provide elsewhere ------

class _Payload(OAuth2Payload):
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._data = dict(items)
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for k, v in items:
            self._datalist[k].append(v)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class _Request(OAuth2Request):
    def __init__(self, request: Request, form: list[tuple[str, str]]) -> None:
        super().__init__(request.method, str(request.url), headers=request.headers)
        self.payload = _Payload(list(request.query_params.multi_items()) + form)
        self._args = dict(request.query_params)
        self._form = dict(form)

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _Server(AuthorizationServer):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(scopes_supported=["openid", "email", "profile"])
        self.provider = provider

    def query_client(self, client_id: str) -> ProviderClient | None:
        return self.provider.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        self.provider.issued.append(token)

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        assert isinstance(request, OAuth2Request)  # built by the route, which has read the body already
        return request

    def create_json_request(self, request: Any) -> JsonRequest:
        raise NotImplementedError("no JSON endpoints here")

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        content = json.dumps(body) if isinstance(body, dict) else (body or "")
        return Response(content, status_code=status, headers=dict(headers or []))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class _DeviceEndpoint(DeviceAuthorizationEndpoint):
    provider: OidcProvider

    def get_verification_uri(self) -> str:
        return self.provider.issuer + "/device"

    def create_endpoint_response(self, request: OAuth2Request) -> Any:
        # the lifetime and polling interval are the test's to choose (RFC 8628 says 5 s by default)
        self.EXPIRES_IN, self.INTERVAL = self.provider.device_expires_in, self.provider.interval
        return super().create_endpoint_response(request)

    def save_device_credential(self, client_id: str, scope: str, data: dict[str, Any]) -> None:
        cred = DeviceCredentialDict(client_id=client_id, scope=scope, expires_at=time.time() + data["expires_in"],
                                    **data)
        self.provider.devices[data["device_code"]] = cred
        self.provider.by_user_code[data["user_code"]] = data["device_code"]


class _DeviceGrant(DeviceCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    @property
    def provider(self) -> OidcProvider:
        return self.server.provider  # type: ignore[no-any-return]

    def query_device_credential(self, device_code: str) -> DeviceCredentialDict | None:
        return self.provider.devices.get(device_code)

    def query_user_grant(self, user_code: str) -> tuple[ProviderUser, bool] | None:
        return self.provider.grants.get(user_code)

    def should_slow_down(self, credential: DeviceCredentialDict) -> bool:
        # polling faster than the interval asked for earns a slow_down (RFC 8628 §3.5)
        t = time.monotonic()
        last = self.provider.last_poll.get(credential["device_code"])
        self.provider.last_poll[credential["device_code"]] = t
        return last is not None and t - last < self.provider.interval * 0.9


class _IdToken(OpenIDToken):
    def __init__(self, provider: OidcProvider) -> None:
        self.provider = provider

    def resolve_client_private_key(self, client: ProviderClient) -> KeySet:
        return KeySet([self.provider.signing_key])

    def get_client_algorithm(self, client: ProviderClient) -> str:
        return "RS256"

    def get_client_claims(self, client: ProviderClient) -> dict[str, Any]:
        return {"iss": self.provider.issuer, "aud": [client.client_id], "exp": int(time.time()) + 3600}

    def get_encode_header(self, client: ProviderClient) -> dict[str, Any]:
        return {"alg": "RS256", "kid": self.provider.signing_key.kid}

    def generate_user_info(self, user: ProviderUser, scope: str) -> UserInfo:
        return UserInfo(user.claims(scope))


class _JwtAccessTokens(JWTBearerTokenGenerator):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(issuer=provider.issuer)
        self.provider = provider

    def get_jwks(self) -> KeySet:
        return KeySet([self.provider.signing_key])

    def get_audiences(self, client: ProviderClient, user: ProviderUser, scope: str) -> str:
        assert client.access_audience
        return client.access_audience

    def get_extra_claims(self, client: ProviderClient, grant_type: str, user: ProviderUser,
                         scope: str) -> dict[str, Any]:
        return user.claims(scope) if user else {}


class _TokensByClient:
    """Authlib's token generator slot, per client: RFC 9068 JWT access tokens or opaque ones."""

    def __init__(self, provider: OidcProvider) -> None:
        self.jwt = _JwtAccessTokens(provider)
        self.opaque = BearerTokenGenerator(lambda **_: generate_token(42))

    def __call__(self, grant_type: str, client: ProviderClient, user: Any = None, scope: str | None = None,
                 expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
        gen = self.jwt if client.access_audience else self.opaque
        return gen(grant_type, client, user, scope, expires_in, include_refresh_token)


# -- the provider ----------------------------------------------------------------------------------------------

@dataclass
class OidcProvider:
    """The provider; ``start()`` serves it on 127.0.0.1 until ``stop()``."""

    workdir: Path
    interval: int = 1  # device-flow polling interval (s) it asks for
    device_expires_in: int = 120
    issuer: str = ""
    ca: Path = Path()
    users: dict[str, ProviderUser] = field(default_factory=dict)
    clients: dict[str, ProviderClient] = field(default_factory=dict)
    devices: dict[str, DeviceCredentialDict] = field(default_factory=dict)
    by_user_code: dict[str, str] = field(default_factory=dict)
    grants: dict[str, tuple[ProviderUser, bool]] = field(default_factory=dict)
    last_poll: dict[str, float] = field(default_factory=dict)
    issued: list[dict[str, Any]] = field(default_factory=list)
    keys: list[RSAKey] = field(default_factory=list)  # published in the JWKS; the last one signs

    def __post_init__(self) -> None:
        self.keys.append(self.new_key())
        self.server = _Server(self)
        self._tokens = _TokensByClient(self)
        self.server.register_token_generator("default", self._tokens)
        device = _DeviceEndpoint(self.server)
        device.provider = self
        self.server.register_endpoint(device)
        self.server.register_grant(_DeviceGrant, [_IdToken(self)])
        self._uv: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- keys and tokens for the tests --------------------------------------------------------------------------
    @staticmethod
    def new_key() -> RSAKey:
        """A fresh RS256 signing key (not published unless added to ``keys``)."""
        return RSAKey.generate_key(2048, parameters={"kid": secrets.token_hex(8), "use": "sig", "alg": "RS256"})

    @property
    def signing_key(self) -> RSAKey:
        return self.keys[-1]

    def rotate_key(self) -> RSAKey:
        """Publish a new key and sign with it from now on (the old one stays in the JWKS)."""
        key = self.new_key()
        self.keys.append(key)
        return key

    def jwks(self) -> dict[str, Any]:
        return KeySet(list(self.keys)).as_dict(private=False)

    def add_user(self, username: str, email: str | None = None, email_verified: bool = True) -> ProviderUser:
        user = ProviderUser(username, sub=secrets.token_hex(12), email=email, email_verified=email_verified)
        self.users[username] = user
        return user

    def add_client(self, client_id: str, access_audience: str | None = None) -> ProviderClient:
        client = ProviderClient(client_id, access_audience)
        self.clients[client_id] = client
        return client

    def mint(self, username: str, *, aud: str | list[str] | None = None, iss: str | None = None,
             expires_in: int = 300, issued_ago: int = 0, nbf_in: int | None = None, key: SigningKey | None = None,
             alg: str = "RS256", header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
             scope: str = "openid email profile") -> str:
        """A JWT about ``username`` signed with the provider's key (or ``key``), with any claims a test needs."""
        user = self.users[username]
        now = int(time.time())
        body: dict[str, Any] = {**user.claims(scope), "iss": self.issuer if iss is None else iss,
                                "aud": aud if aud is not None else "xwhep", "iat": now - issued_ago,
                                "exp": now - issued_ago + expires_in, "jti": secrets.token_hex(8)}
        if nbf_in is not None:
            body["nbf"] = now + nbf_in
        body.update(claims or {})
        signer = key if key is not None else self.signing_key
        hdr = {"alg": alg, "typ": "JWT", **({"kid": signer.kid} if signer is not None and signer.kid else {}),
               **(header or {})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joserfc rightly warns about "none": minting it is the point here
            return jwt.encode(hdr, body, signer, algorithms=[alg])

    # -- the person's step (what the browser does) -----------------------------------------------------------------
    def approve(self, user_code: str, username: str, approve: bool = True) -> None:
        self.grants[user_code] = (self.users[username], approve)

    def expire(self, user_code: str) -> None:
        self.devices[self.by_user_code[user_code]]["expires_at"] = time.time() - 1

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        meta = OpenIDProviderMetadata(
            issuer=self.issuer,
            jwks_uri=self.issuer + "/jwks",
            token_endpoint=self.issuer + "/token",
            device_authorization_endpoint=self.issuer + "/device_authorization",
            grant_types_supported=[DeviceCodeGrant.GRANT_TYPE],
            response_types_supported=["code"],
            subject_types_supported=["public"],
            id_token_signing_alg_values_supported=["RS256"],
            token_endpoint_auth_methods_supported=["none"],
            scopes_supported=["openid", "email", "profile"],
            claims_supported=["sub", "iss", "aud", "exp", "iat", "email", "email_verified", "preferred_username",
                              "name"],
        )
        meta.validate()
        return dict(meta)

    def app(self) -> Starlette:
        async def discovery(_: Request) -> JSONResponse:
            return JSONResponse(self.metadata())

        async def jwks(_: Request) -> JSONResponse:
            return JSONResponse(self.jwks())

        async def device_authorization(request: Request) -> Response:
            form = list((await request.form()).multi_items())
            return self.server.create_endpoint_response(  # type: ignore[no-any-return]
                DeviceAuthorizationEndpoint.ENDPOINT_NAME, _Request(request, form))  # type: ignore[arg-type]

        async def token(request: Request) -> Response:
            form = list((await request.form()).multi_items())
            return self.server.create_token_response(_Request(request, form))  # type: ignore[arg-type,no-any-return]

        async def device_page(request: Request) -> HTMLResponse:
            code = html.escape(request.query_params.get("user_code", ""))
            return HTMLResponse(f"<form method=post action=/device/approve><input name=user_code value='{code}'>"
                                "<input name=username><button>Approve</button></form>")

        async def device_approve(request: Request) -> JSONResponse:
            if request.headers.get("content-type", "").startswith("application/json"):
                data = await request.json()
            else:
                data = dict(await request.form())
            code, username = str(data.get("user_code", "")).upper(), str(data.get("username", ""))
            if code not in self.by_user_code:
                return JSONResponse({"error": "unknown user code"}, status_code=404)
            if username not in self.users:
                return JSONResponse({"error": "unknown user"}, status_code=403)
            self.approve(code, username, str(data.get("approve", "true")).lower() not in ("false", "0", "no"))
            return JSONResponse({"ok": True})

        return Starlette(routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
            Route("/device_authorization", device_authorization, methods=["POST"]),
            Route("/token", token, methods=["POST"]),
            Route("/device", device_page),
            Route("/device/approve", device_approve, methods=["POST"]),
        ])

    def start(self) -> OidcProvider:
        """Serve on a free loopback port over HTTPS; returns once it accepts connections."""
        pki = self.workdir / "pki"
        ca, ca_key = create_ca(pki, cn="test OIDC provider CA")
        cert, key = issue_server_cert(ca, ca_key, pki, ["localhost"], ["127.0.0.1"])
        self.ca = ca
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.issuer = f"https://127.0.0.1:{sock.getsockname()[1]}"
        self._tokens.jwt.issuer = self.issuer  # known only now that the port is
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=str(cert), ssl_keyfile=str(key))
        self._uv = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="oidc-provider")
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OIDC provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._uv is not None and self._thread is not None:
            self._uv.should_exit = True
            self._thread.join(10)
        self._uv = self._thread = None
