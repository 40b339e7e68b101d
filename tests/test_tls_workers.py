"""--workers over mutual TLS: two TLS workers (scripts/worker.py --tls_*) on 127.0.0.1 train what a local run
trains; a coordinator without TLS, with a certificate another CA signed, or trusting another CA is refused with one
line. The certificates are a throw-away CA made here with the `cryptography` package."""

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import call_train, finish, start_script
from test_workers import ARGS, _weights
from tff_pipeline import runtime


def _pki(directory):
    """A CA, a worker certificate for 127.0.0.1 and a coordinator certificate it signed; and a rogue CA with its
    own coordinator certificate. Returns the PEM paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths = {}

    def write(name, key, cert):
        paths[name + "_key"] = str(directory / f"{name}.key")
        paths[name] = str(directory / f"{name}.pem")
        with open(paths[name + "_key"], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(paths[name], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))

    def make(name, issuer=None, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        cert = b.sign(issuer[1] if issuer else key, hashes.SHA256())
        write(name, key, cert)
        return cert, key

    ca = make("ca", ca=True)
    make("worker", issuer=ca, server=True)
    make("coordinator", issuer=ca)
    rogue = make("rogue_ca", ca=True)
    make("rogue_coordinator", issuer=rogue)
    return paths


def _wait_for_port(port, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no TLS worker on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def tls_workers(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki = _pki(d)
    procs, ports = [], []
    for _ in range(2):
        port = runtime._free_port()
        procs.append(start_script("worker.py", f"--port={port}", f"--tls_cert={pki['worker']}",
                                  f"--tls_key={pki['worker_key']}", f"--tls_client_ca={pki['ca']}",
                                  sigint_default=True))  # stopped by SIGINT below
        ports.append(port)
    try:
        for p, port in zip(procs, ports):
            _wait_for_port(port, p)
        yield pki, ports
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        stuck = []
        for p in procs:
            try:  # communicate, not wait: it drains the pipes, which a worker blocked on a full one cannot
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                stuck.append(_stuck_report(p))
    assert all(p.returncode == 0 for p in procs), f"exit codes {[p.returncode for p in procs]}; {stuck}"


def _stuck_report(p):
    """What a worker that did not stop within 60 s of SIGINT was doing: its kernel state and signal masks, then
    every thread's Python stack (scripts/worker.py dumps them on SIGUSR1); then it is killed. (It showed SIGINT
    ignored, inherited from a `make test` started in the background: hence ``sigint_default``.)"""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            state = [line for line in f.read().splitlines() if line.startswith(("State", "Sig", "ShdPnd", "Threads"))]
    except OSError as e:
        state = [f"/proc/{p.pid}/status: {e}"]
    p.send_signal(signal.SIGUSR1)
    try:
        _, err = p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return {"pid": p.pid, "status": state, "stderr_tail": (err or "")[-4000:]}


def _tls(pki, coordinator="coordinator", ca="ca"):
    return [f"--workers_tls_ca={pki[ca]}", f"--workers_tls_cert={pki[coordinator]}",
            f"--workers_tls_key={pki[coordinator + '_key']}"]


def test_two_tls_workers_match_a_local_run(tmp_path, tls_workers):
    pki, ports = tls_workers
    local = start_script("train.py", f"--output_dir={tmp_path / 'local'}", *ARGS)
    remote = start_script("train.py", f"--output_dir={tmp_path / 'remote'}",
                          "--workers=" + ",".join(f"127.0.0.1:{p}" for p in ports), *_tls(pki), *ARGS)
    local, remote = finish(local), finish(remote)
    assert local.returncode == 0, local.stderr[-3000:]
    assert remote.returncode == 0, remote.stderr[-3000:]
    a, b = _weights(tmp_path / "local" / "final_weights.h5"), _weights(tmp_path / "remote" / "final_weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("case, words", [
    ("plaintext", "speaks TLS; give --workers_tls_ca"),
    ("rogue_certificate", "refused this coordinator's certificate"),
    ("rogue_ca", "does not verify against --workers_tls_ca"),
])
def test_a_coordinator_the_worker_does_not_trust_is_refused_in_one_line(tmp_path, tls_workers, case, words):
    pki, ports = tls_workers
    tls = {"plaintext": [], "rogue_certificate": _tls(pki, coordinator="rogue_coordinator"),
           "rogue_ca": _tls(pki, ca="rogue_ca")}[case]
    p = call_train(f"--output_dir={tmp_path / 'r'}", f"--workers=127.0.0.1:{ports[0]}", *tls, *ARGS)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.path.exists(tmp_path / "r" / "config.json")


def test_tls_flags_need_each_other_and_workers(tmp_path):
    p = call_train(f"--output_dir={tmp_path / 'r'}", "--workers_tls_ca=/nonexistent.pem", *ARGS)
    assert p.returncode == 2 and "give --workers=HOST:PORT" in p.stderr
    p = call_train(f"--output_dir={tmp_path / 'r'}", "--workers=127.0.0.1:1", "--workers_tls_ca=/nonexistent.pem",
                   *ARGS)
    assert p.returncode == 2 and "--workers_tls_cert, --workers_tls_key not given" in p.stderr, p.stderr
