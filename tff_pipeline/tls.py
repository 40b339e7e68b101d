"""Mutual TLS between the coordinator and its TFF workers.

TFF 0.87's ``worker_binary`` speaks plaintext gRPC on every interface and has no TLS flag. A TLS worker
(``scripts/worker.py --tls_cert --tls_key --tls_client_ca``) is that binary on an internal port behind
:class:`Forwarder`: a TLS terminator (ALPN h2) that accepts only clients whose certificate the worker's client CA
signed and forwards their bytes to the internal port. The coordinator (``--workers_tls_ca``,
``--workers_tls_cert``, ``--workers_tls_key``) opens ``grpc.secure_channel`` with its own certificate and checks
the worker's against its CA, and :func:`probe` turns a failed handshake into a one-line error before TFF starts.
Keep the internal port unreachable from the network (README, "Remote workers").
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import sys
from typing import Optional

from tff_pipeline.errors import UserError


class TlsError(UserError):
    """A TLS setting or handshake the user must fix."""


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """The coordinator's side: the CA that signs the workers' certificates, and its own certificate and key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def from_flags(cls, ca: str, cert: str, key: str) -> Optional["ClientTls"]:
        given = {"--workers_tls_ca": ca, "--workers_tls_cert": cert, "--workers_tls_key": key}
        if not any(given.values()):
            return None
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise TlsError(f"mutual TLS needs all three of --workers_tls_ca, --workers_tls_cert and "
                           f"--workers_tls_key; {', '.join(missing)} not given")
        for k, v in given.items():
            if not os.path.isfile(v):
                raise TlsError(f"{k}={v}: no such file; give the PEM file's path")
        return cls(ca, cert, key)

    def grpc_credentials(self):
        import grpc

        with open(self.ca, "rb") as f, open(self.cert, "rb") as c, open(self.key, "rb") as k:
            return grpc.ssl_channel_credentials(root_certificates=f.read(), private_key=k.read(),
                                                certificate_chain=c.read())

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(self.ca)
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, ValueError) as e:
            raise TlsError(f"--workers_tls_ca/--workers_tls_cert/--workers_tls_key: not a usable CA, certificate "
                           f"and key ({e}); give PEM files, the key matching the certificate") from None
        ctx.set_alpn_protocols(["h2"])
        return ctx


def server_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """The worker's side: its certificate, and only clients whose certificate ``client_ca`` signed."""
    for flag, path in (("--tls_cert", cert), ("--tls_key", key), ("--tls_client_ca", client_ca)):
        if not os.path.isfile(path):
            raise TlsError(f"{flag}={path}: no such file; give the PEM file's path")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(client_ca)
    except (ssl.SSLError, ValueError) as e:
        raise TlsError(f"--tls_cert/--tls_key/--tls_client_ca: not a usable certificate, key and CA ({e}); give "
                       f"PEM files, the key matching the certificate") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def probe(address: str, tls: Optional[ClientTls], timeout: float = 5.0) -> None:
    """Raises a one-line TlsError when the worker at ``address`` and this coordinator's TLS settings do not match:
    a TLS worker without --workers_tls_*, a plaintext worker with them, a worker certificate the CA did not sign, or
    this coordinator's certificate refused by the worker. Under TLS 1.3 the client's handshake ends before the
    server checks the client's certificate, so a refusal shows as the connection closed right after it."""
    host, port = _split(address)
    if tls is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection((host, port), timeout=timeout) as s, ctx.wrap_socket(s):
                speaks_tls = True  # the worker completed a TLS handshake
        except OSError:  # ssl.SSLError included: a plaintext gRPC worker does not answer a ClientHello in TLS
            speaks_tls = False
        if speaks_tls:
            raise TlsError(f"--workers: the worker at {address} speaks TLS; give --workers_tls_ca, "
                           f"--workers_tls_cert and --workers_tls_key (README, 'Remote workers')")
        return
    ctx = tls.context()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s, \
                ctx.wrap_socket(s, server_hostname=host) as t:
            t.settimeout(1.0)
            try:
                refused = t.recv(1) == b""  # closed at once: the worker refused our certificate
            except socket.timeout:
                refused = False  # still open and quiet: accepted, the worker waits for gRPC
            except (ssl.SSLError, ConnectionError):
                refused = True
    except ssl.SSLCertVerificationError as e:
        raise TlsError(f"--workers: the certificate of the worker at {address} does not verify against "
                       f"--workers_tls_ca={tls.ca} ({e.verify_message}); use the CA that signed the worker's "
                       f"certificate, issued for {host}") from None
    except ssl.SSLError as e:
        raise TlsError(f"--workers: no TLS at {address} ({e.reason or e}); start the worker with scripts/worker.py "
                       f"--tls_cert, --tls_key and --tls_client_ca, or drop --workers_tls_*") from None
    except OSError as e:
        raise TlsError(f"--workers: the TLS handshake with {address} failed ({e}); is it a TLS worker "
                       f"(scripts/worker.py --tls_cert ...)?") from None
    if refused:
        raise TlsError(f"--workers: the worker at {address} refused this coordinator's certificate (it closed the "
                       f"connection after the handshake); --workers_tls_cert must be signed by the CA the worker "
                       f"trusts (its --tls_client_ca)")


class Forwarder:
    """TLS terminator: accepts mutual-TLS connections on ``port`` and pipes each to 127.0.0.1:``target_port``.
    A client without a certificate signed by the client CA is refused in the handshake."""

    def __init__(self, ctx: ssl.SSLContext, port: int, target_port: int, host: str = "0.0.0.0", log=None):
        self.ctx, self.port, self.target_port, self.host = ctx, port, target_port, host
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (already closed)
                pass

    async def _handle(self, reader, writer) -> None:
        # The worker is dialled once the client speaks, so a client that only checks the handshake (probe) sees an
        # open, quiet connection, and a refused certificate an immediate close, whatever the worker's state.
        try:
            first = await reader.read(1 << 16)
        except (ConnectionError, ssl.SSLError):
            first = b""
        if not first:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError as e:
            self.log(f"TLS forwarder: the TFF worker on port {self.target_port} is not answering ({e})")
            writer.close()
            return
        up_writer.write(first)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _on_error(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError)):
            peer = context.get("transport").get_extra_info("peername") if context.get("transport") else None
            self.log(f"TLS forwarder: refused a connection from {peer}: {getattr(exc, 'reason', None) or exc}")
            return
        loop.default_exception_handler(context)

    async def serve(self, ready=None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._on_error)
        server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.ctx,
                                            ssl_handshake_timeout=10)
        if ready is not None:
            ready()
        async with server:
            await server.serve_forever()
