"""The runtime probes of `llmtap doctor`: a TLS handshake in each runtime's own language, whose
answer names the issuer of the certificate it accepted (one JSON line on stdout)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from llmtap.platform.linux.systemd import interpreter_of
from llmtap.platform.linux.trust import Which
from llmtap.platform.runner import Completed

ISSUER = "llmtap local CA"  # llmtap.ca.create_ca's subject
PROBE_PATH = "/llmtap-doctor"
PROBE_KEY = "llmtap-doctor-probe-not-a-key"
TLS_TROUBLE = re.compile(
    r"certificate|self[- ]signed|issuer|UnknownIssuer|unable to verify|CERT_|SSL|TLS", re.IGNORECASE)
REACHED_API = re.compile(
    r"\b401\b|invalid.{0,20}api.?key|incorrect api key|authentication_error|unauthori[sz]ed",
    re.IGNORECASE)


PYTHON_PROBE = textwrap.dedent("""\
    import json, os, socket, ssl, sys
    host = sys.argv[1]
    cafile, source = os.environ.get("SSL_CERT_FILE") or None, "SSL_CERT_FILE"
    if cafile is None:  # what httpx, requests and the SDKs do without SSL_CERT_FILE
        try:
            import certifi
            cafile, source = certifi.where(), "certifi"
        except ImportError:
            source = "the system store"
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        with socket.create_connection((host, 443), timeout=15) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                issuer = dict(item[0] for item in tls.getpeercert()["issuer"])
                print(json.dumps({"ok": True, "issuer": issuer.get("commonName", ""),
                                  "source": source}))
    except ssl.SSLCertVerificationError as exc:
        print(json.dumps({"ok": False, "error": exc.verify_message, "source": source}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "source": source, "network": True}))
""")

NODE_PROBE = textwrap.dedent("""\
    const tls = require("tls");
    const host = process.argv[1];
    const done = (o) => { console.log(JSON.stringify(o)); process.exit(0); };
    const s = tls.connect({host, port: 443, servername: host, timeout: 15000}, () => {
      const c = s.getPeerCertificate();
      done({ok: s.authorized, issuer: (c.issuer || {}).CN || ""});
    });
    const NETWORK = ["ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "ETIMEDOUT", "EHOSTUNREACH",
                     "ENETUNREACH", "EAI_AGAIN", "EPIPE"];
    s.on("error", (e) => done({ok: false, error: e.code === "UNSPECIFIED" ? e.message : e.code || e.message,
                               network: NETWORK.includes(e.code)}));
    s.on("timeout", () => done({ok: false, error: "timeout", network: true}));
""")


# Java runs a single source file (java File.java) since Java 11: no build step, no class files.
JAVA_PROBE = textwrap.dedent("""\
    import javax.net.ssl.*;
    public class LlmtapProbe {
        static String quoted(Object o) {
            return "\\"" + String.valueOf(o).replace("\\\\", "/").replace("\\"", "'") + "\\"";
        }
        public static void main(String[] args) {
            String host = args[0];
            try (SSLSocket socket = (SSLSocket) SSLSocketFactory.getDefault().createSocket(host, 443)) {
                SSLParameters params = socket.getSSLParameters();
                params.setEndpointIdentificationAlgorithm("HTTPS");
                socket.setSSLParameters(params);
                socket.setSoTimeout(15000);
                socket.startHandshake();
                java.security.cert.X509Certificate leaf =
                    (java.security.cert.X509Certificate) socket.getSession().getPeerCertificates()[0];
                System.out.println("{\\"ok\\": true, \\"issuer\\": "
                    + quoted(leaf.getIssuerX500Principal().getName()) + "}");
            } catch (SSLException e) {
                System.out.println("{\\"ok\\": false, \\"error\\": " + quoted(e.getMessage()) + "}");
            } catch (Exception e) {
                System.out.println("{\\"ok\\": false, \\"network\\": true, \\"error\\": "
                    + quoted(e) + "}");
            }
        }
    }
""")


def run_with_env(argv: list[str], env: dict[str, str], timeout_s: float = 60.0) -> Completed:
    """Like platform.runner.SubprocessRunner, in a given environment."""
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return Completed(124, "", f"{argv[0]} did not answer within {timeout_s:g}s")
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def parse_json_line(result: Completed) -> dict[str, Any]:
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            try:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
            except ValueError:
                break
    return {"ok": False, "error": result.reason(), "network": True}


def node_interpreter(executable: Path, which: Which) -> Path | None:
    """The Node that runs this CLI, when it is a Node script (npm installs)."""
    real = Path(os.path.realpath(executable))
    interpreter = interpreter_of(real)
    if interpreter is not None and interpreter.name in ("node", "nodejs"):
        return interpreter
    if real.suffix in (".js", ".mjs", ".cjs") and (node := which("node")):
        return Path(node)
    return None
