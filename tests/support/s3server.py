"""An S3-protocol server on this machine for the S3 tests: moto's server mode (the `dev` extra,
``moto[server]``) in a thread of the test process, on a free loopback port.

The runtime talks to it exactly as it talks to AWS or MinIO: boto3 with ``AWS_ENDPOINT_URL``
and credentials from the environment (dummy ones here; moto accepts any).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 server; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a pod gets from spec.storage.s3 (dummy credentials for moto)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
