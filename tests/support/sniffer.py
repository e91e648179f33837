"""An attacker's listener, run by the tests inside the upstream namespace: it keeps every byte a
connection brings (after TLS, when given a certificate its peers should never trust) and answers
each with a bare 200, so a test can grep what would have been stolen.

    python sniffer.py --bind 10.0.0.4:443 --log L [--cert PEM]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
         b"connection: close\r\n\r\n{}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--cert")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with open(args.log, "ab") as log:
            try:
                while data := await asyncio.wait_for(reader.read(65536), 2):
                    log.write(data)
                    log.flush()
                    if b"\r\n\r\n" in data:
                        writer.write(REPLY)
                        await writer.drain()
            except (TimeoutError, OSError, ssl.SSLError):
                pass
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, host.strip("[]"), int(port), ssl=context)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
