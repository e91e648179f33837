"""The fake upstream's AWS Bedrock runtime (used by tests/support/fake_providers.py).

`POST /model/{modelId}/<operation>` gets its fixture (tests/fixtures/streams/bedrock_*) with the
headers Bedrock sends. A SigV4-signed request is checked as AWS checks it, with the test
credentials below: a request llmtap changed on its way (a header, the path, the body) is refused
with Bedrock's InvalidSignatureException, so the e2e tests prove that the client's signature
still holds when it reaches the provider. A Bearer API key is not checked here.
"""

from __future__ import annotations

import re
from typing import Any

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example credentials
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REQUEST_ID = "8c4f6a0e-2b3d-4e5f-9a1b-c2d3e4f5a6b7"
OPERATION = re.compile(r"^/model/.+/(invoke|invoke-with-response-stream|converse|converse-stream"
                       r"|count-tokens)$")
_FIXTURES = {
    "invoke": "bedrock_invoke.json",
    "invoke-with-response-stream": "bedrock_invoke_stream.eventstream",
    "converse": "bedrock_converse.json",
    "converse-stream": "bedrock_converse_stream.eventstream",
    "count-tokens": "bedrock_count_tokens.json",
}
Headers = list[tuple[bytes, bytes]]


def default_fixture(path: str) -> str | None:
    match = OPERATION.match(path)
    return _FIXTURES[match.group(1)] if match else None


def reply_headers(name: str) -> Headers:
    """What Bedrock sends along with each fixture."""
    headers: Headers = [(b"x-amzn-requestid", REQUEST_ID.encode())]
    if name == "bedrock_invoke.json":  # InvokeModel's own counts, for every model
        headers += [(b"x-amzn-bedrock-input-token-count", b"2095"),
                    (b"x-amzn-bedrock-output-token-count", b"503"),
                    (b"x-amzn-bedrock-invocation-latency", b"1873")]
    if name.startswith("bedrock_invoke_stream"):
        headers.append((b"x-amzn-bedrock-content-type", b"application/json"))
    if name == "bedrock_error_429.json":
        headers.append((b"x-amzn-errortype",
                        b"ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"))
    return headers


def signature_problem(scope: dict[str, Any], body: bytes) -> str | None:
    """Why a SigV4 signature does not verify; None when it does or the request is not SigV4."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    headers.setdefault("host", headers.get(":authority", ""))
    scheme, _, params = headers.get("authorization", "").partition(" ")
    if scheme != "AWS4-HMAC-SHA256":
        return None
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    access_key, _, region, service, _ = fields["Credential"].split("/")
    if access_key != ACCESS_KEY:
        return f"The security token included in the request is invalid ({access_key})"
    signed = fields["SignedHeaders"].split(";")
    query = scope.get("query_string", b"").decode()
    url = f"https://{headers['host']}{scope['raw_path'].decode()}" + (f"?{query}" if query else "")
    request = AWSRequest(method=scope["method"], url=url, data=body,
                         headers={name: headers[name] for name in signed if name in headers})
    request.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, headers.get("x-amz-security-token")),
                       service, region)
    canonical = signer.canonical_request(request)
    if signer.signature(signer.string_to_sign(request, canonical), request) == fields["Signature"]:
        return None
    return ("The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.")
