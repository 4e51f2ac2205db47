"""Who is really asking: the end user behind a trusted front end's key.

A team reaches Corral through one chat UI holding one API key, so without this every end
user collapses into that key. A key marked `frontend = "openwebui"` (or `"headers"` with
its own header names) has the identity its front end forwards believed, in this order:

1. with `frontend_jwt_secret`: the signed JWT only. It is verified (HS256 signature,
   `exp`, `iss`); a missing, bad or expired token is a 401, never a fallback to the key
   or to plain headers (anyone holding the key could otherwise pose as anyone);
2. else the plain identity headers;
3. else the OpenAI `user` field of the body.

Forwarded identity on any other key is ignored, so nobody can pose as someone else.

Open WebUI's names are hard-coded from its source (backend/open_webui/env.py and
backend/open_webui/utils/headers.py, `include_user_info_headers` / `_mint_forward_user_jwt`,
enabled by ENABLE_FORWARD_USER_INFO_HEADERS=true): headers `X-OpenWebUI-User-Id`,
`X-OpenWebUI-User-Name` (URL-quoted), `X-OpenWebUI-User-Email`, `X-OpenWebUI-User-Role`,
`X-OpenWebUI-Chat-Id`; with FORWARD_USER_INFO_HEADER_JWT_SECRET set, one HS256 JWT in
`X-OpenWebUI-User-Jwt` instead, claims `sub`, `email`, `name`, `role`, `iss` = "open-webui",
`iat`, `exp`.

Metrics never carry names or emails: `EndUser.metric_id` is a digest of the key's user
and the forwarded id, stable across restarts and replicas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import jwt

from gateway.auth import unauthorized
from gateway.config import ApiKey

OPENWEBUI_HEADERS = {
    "user": "X-OpenWebUI-User-Id",
    "name": "X-OpenWebUI-User-Name",
    "email": "X-OpenWebUI-User-Email",
    "role": "X-OpenWebUI-User-Role",
    "chat": "X-OpenWebUI-Chat-Id",
    "jwt": "X-OpenWebUI-User-Jwt",
}
OPENWEBUI_ISSUER = "open-webui"
MAX_ID = 256  # characters of a forwarded id kept
LEEWAY = 5.0  # seconds of clock skew tolerated on exp / iat


@dataclass(frozen=True)
class EndUser:
    """One person behind a front-end key."""

    id: str  # the forwarded id (JWT sub, the user-id header, or the `user` field)
    key_user: str  # the user name of the key it came through
    source: str  # "jwt", "headers" or "user"
    name: str = ""
    email: str = ""
    role: str = ""
    chat: str = ""  # the conversation id, when the front end sends one

    @property
    def metric_id(self) -> str:
        """A stable label for metrics: never the name, email or raw id."""
        raw = f"{self.key_user}\x00{self.id}".encode()
        return "eu-" + hashlib.blake2b(raw, digest_size=6).hexdigest()

    @property
    def queue_user(self) -> str:
        """The fair queue's user: every end user is a user of its own there."""
        return f"{self.key_user}/{self.id}"


def header_names(key: ApiKey) -> dict[str, str]:
    names = dict(OPENWEBUI_HEADERS) if key.frontend == "openwebui" else {}
    names.update(dict(key.frontend_headers))
    return names


def resolve(key: ApiKey | None, headers: Mapping[str, str], body: Any = None,
            *, need_identity: bool = True) -> EndUser | None:
    """The end user of a request, or None (not a front-end key, or nobody named).
    Raises a 401 APIError for a front end that must sign and did not sign validly.
    `need_identity=False` (e.g. GET /v1/models, which front ends call with no user)
    skips the JWT requirement when no token is sent."""
    if key is None or key.frontend is None:
        return None
    names = header_names(key)
    chat = _clip(headers.get(names["chat"], "")) if "chat" in names else ""
    if key.frontend_jwt_secret:
        token = headers.get(names.get("jwt", OPENWEBUI_HEADERS["jwt"]), "")
        if not token:
            if not need_identity:
                return None
            raise unauthorized(f"This key belongs to a front end that must sign its users: "
                               f"send the user's JWT in {names.get('jwt')}.")
        claims = _verify(token, key.frontend_jwt_secret, key.frontend == "openwebui")
        return EndUser(_clip(str(claims["sub"])), key.user, "jwt", str(claims.get("name", "")),
                       str(claims.get("email", "")), str(claims.get("role", "")), chat)
    uid = _clip(headers.get(names["user"], "")) if "user" in names else ""
    if uid:
        return EndUser(uid, key.user, "headers",
                       unquote(headers.get(names.get("name", ""), "")) if "name" in names
                       else "", headers.get(names.get("email", ""), ""),
                       headers.get(names.get("role", ""), ""), chat)
    user = body.get("user") if isinstance(body, dict) else None
    if isinstance(user, str) and user:
        return EndUser(_clip(user), key.user, "user", chat=chat)
    return None


def _verify(token: str, secret: str, openwebui: bool) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], leeway=LEEWAY,
            issuer=OPENWEBUI_ISSUER if openwebui else None,
            options={"require": ["sub", "exp"], "verify_iss": openwebui})
    except jwt.ExpiredSignatureError:
        raise unauthorized("The forwarded user JWT has expired.") from None
    except jwt.InvalidSignatureError:
        raise unauthorized("The forwarded user JWT has a bad signature.") from None
    except jwt.PyJWTError as exc:  # malformed, wrong issuer, missing claims
        raise unauthorized(f"The forwarded user JWT is not valid: {exc}.") from None
    if not str(claims.get("sub", "")):
        raise unauthorized("The forwarded user JWT names no user (empty sub).")
    return claims


def _clip(v: str) -> str:
    return v.strip()[:MAX_ID]
