"""A minimal OAuth 2.0 / OIDC identity provider for the tests, as Confluent Cloud's and
Microsoft Entra ID's are to a Kafka client using the client-credentials grant.

  POST /token  grant_type=client_credentials, client id and secret in HTTP Basic (as librdkafka
               sends them) or in the form; answers {"access_token": <RS256 JWT>, "token_type":
               "Bearer", "expires_in": N}, the JWT with sub = client id, aud = "kafka", exp,
               iat, iss and the requested scope. A wrong secret gets 401 invalid_client.
  GET  /jwks   the signing key as a JWK set (what the broker validates tokens against).
  GET  /stats  {"issued": {client_id: count}} (tests check that tokens are fetched).

Usage: python oidc_idp.py PORT CLIENTS_JSON [LIFETIME_S]
  CLIENTS_JSON: {"client-id": "client-secret", ...}
"""

import base64
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PORT = int(sys.argv[1])
CLIENTS = json.loads(sys.argv[2])
LIFETIME = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
KID = "lakesink-test-key"
ISSUER = f"http://127.0.0.1:{PORT}"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUED = {}
LOCK = threading.Lock()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def jwt(claims: dict) -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": KID}
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    )
    signature = KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def jwks() -> dict:
    pub = KEY.public_key().public_numbers()
    return {
        "keys": [
            {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": KID, "n": uint(pub.n), "e": uint(pub.e)}
        ]
    }


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/jwks":
            self.reply(200, jwks())
        elif self.path == "/stats":
            with LOCK:
                self.reply(200, {"issued": dict(ISSUED)})
        else:
            self.reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        if self.path != "/token":
            self.reply(404, {"error": "not_found"})
            return
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        client_id = form.get("client_id", [None])[0]
        secret = form.get("client_secret", [None])[0]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            decoded = base64.b64decode(auth[6:]).decode()
            client_id, _, secret = decoded.partition(":")
            client_id = urllib.parse.unquote(client_id)
            secret = urllib.parse.unquote(secret)
        if form.get("grant_type", [None])[0] != "client_credentials":
            self.reply(400, {"error": "unsupported_grant_type"})
            return
        if client_id not in CLIENTS or CLIENTS[client_id] != secret:
            self.reply(401, {"error": "invalid_client", "error_description": "bad client credentials"})
            return
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": client_id, "aud": "kafka", "iat": now, "exp": now + LIFETIME}
        scope = form.get("scope", [None])[0]
        if scope:
            claims["scope"] = scope
        with LOCK:
            ISSUED[client_id] = ISSUED.get(client_id, 0) + 1
        self.reply(200, {"access_token": jwt(claims), "token_type": "Bearer", "expires_in": LIFETIME})

    def log_message(self, fmt, *args) -> None:
        sys.stderr.write("oidc-idp: " + (fmt % args) + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
