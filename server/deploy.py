"""Deployment on Flower's deployment engine: one SuperNode per merchant or region, TLS, node auth.

``fedrec deploy <command>`` (docs/deployment.md walks through them):

    certs      a certificate authority and the SuperLink's certificate (SANs for its names / IPs)
    node-key   an ECDSA P-384 key pair for one SuperNode, in the OpenSSH formats Flower reads
    superlink  start a SuperLink: TLS, SuperNode authentication, a state database, no runtime
               dependency installation
    federation write the ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml``
    register   admit a node's public key (``flwr supernode register``)
    supernode  start a SuperNode for one merchant / region with its data, catalogue, privacy policy
               and ledger folder as node config (``client/node.py``), optionally supervised
    run        launch a run (``flwr run``) against a federation
    demo-data  a synthetic log split into one file per region, plus the catalogue and a policy

Keys and certificates are made with the ``cryptography`` package (no ``openssl`` or ``ssh-keygen``).
Every Flower process is started from the executables next to this Python (``sys.executable``), so a
virtual environment's Flower is the one that runs.

A SuperNode stops when the SuperLink refuses it: a Flower 1.41 node restarted while the SuperLink
still holds its old session (up to about a minute; 65 s in the tests) logs ``Exit Code: 305``
(``SUPERNODE_CONNECTION_ERROR``, API error 2004 "Failed to activate SuperNode") and exits with
status 1 (Flower exits with 1 for every error; the code is only in the log). :class:`Supervisor`
restarts such a process with exponential backoff and gives up only on codes that mean a
configuration error (:data:`PERMANENT_EXIT_CODES`). :class:`LocalFederation` puts a whole
deployment on 127.0.0.1 for trials, tests and benchmarks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SUPERLINK_DB = "superlink.db"

PERMANENT_EXIT_CODES = frozenset({302, 303, 304, 600, 602, 603, 604, 605, 606, 607, 608})
"""Flower exit codes a restart cannot fix: a bad auth key (302), node auth without TLS (303), bad
trusted entities (304), a bad address (600), TLS files missing or incompatible (602-605), an
incompatible runtime (606), an app that cannot be imported (607) or installed (608)."""


# -- keys and certificates ---------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(out_dir: str | Path, *, common_name: str = "fedrec deployment CA", days: int = 3650) -> Path:
    """A self-signed certificate authority (ECDSA P-384): ``ca.crt`` and ``ca.key`` (0600) in ``out_dir``.

    The CA certificate goes to every SuperNode and every ``flwr`` user (``--root-certificates``,
    ``root-certificates``); the CA key signs server certificates and should stay offline.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    key = _new_ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(out / CA_KEY, _pem_key(key))
    (out / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / CA_CERT


def _san(name: str):
    from cryptography import x509
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def create_server_certificate(out_dir: str | Path, *, ca_dir: str | Path, names: Sequence[str],
                              days: int = 825) -> tuple[Path, Path]:
    """The SuperLink's certificate signed by the CA in ``ca_dir``: ``server.pem``, ``server.key`` (0600).

    ``names`` are the host names and IP addresses the SuperNodes and ``flwr`` use to reach the
    SuperLink (each becomes a subjectAltName: an IP address when it parses as one, a DNS name
    otherwise); the first is also the common name.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"names must be one or more host names / IP addresses of the SuperLink, got {names!r}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    ca_dir, out = Path(ca_dir), Path(out_dir)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    key = _new_ec_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(out / SERVER_KEY, _pem_key(key))
    (out / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / SERVER_CERT, out / SERVER_KEY


def create_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode ``name``: ``<name>.key`` (OpenSSH private, 0600), ``<name>.pub``.

    The formats are those ``ssh-keygen -t ecdsa -b 384`` writes and Flower reads
    (``--auth-supernode-private-key``; ``flwr supernode register <name>.pub``).
    """
    from cryptography.hazmat.primitives import serialization

    _check_name(name)
    out = Path(out_dir)
    key = _new_ec_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(out / f"{name}.key", private)
    (out / f"{name}.pub").write_bytes(public + f" {name}\n".encode())
    return out / f"{name}.key", out / f"{name}.pub"


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {name!r}")


# -- Flower commands ---------------------------------------------------------------------------


def flower_executable(name: str) -> str:
    """``name`` (``flwr``, ``flower-superlink``, ``flower-supernode``) next to this Python, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither next to {sys.executable} nor on PATH; install flwr")
    return found


def _quoted(key: str, value: Any) -> str:
    """One ``key=value`` pair in the syntax of Flower's ``--node-config`` / ``--run-config``."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"{key} = {text!r}: a value passed to Flower may not contain '\"' or a newline")
    return f'{key}="{text}"'


def config_arg(values: Mapping[str, Any]) -> str:
    """``{"name": "eu", "rounds": 2}`` -> ``'name="eu" rounds=2'`` (Flower's key=value list)."""
    return " ".join(_quoted(k, v) for k, v in values.items())


@dataclass(frozen=True)
class SuperLinkSpec:
    """Where a SuperLink listens and keeps its state; ``certs_dir`` holds ``ca.crt``, ``server.pem``, ``server.key``."""

    certs_dir: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9093
    node_auth: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """``flower-superlink`` with TLS, node auth, a state database and no runtime dependency installation.

    One port serves the Fleet, Control and Runtime APIs (Flower 1.41).
    """
    certs = Path(spec.certs_dir)
    cmd = [flower_executable("flower-superlink"),
           "--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
           "--ssl-keyfile", str(certs / SERVER_KEY),
           "--database", str(Path(spec.state_dir) / SUPERLINK_DB),
           "--host", spec.host, "--port", str(spec.port),
           "--disable-runtime-dependency-installation"]
    if spec.node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


@dataclass(frozen=True)
class SuperNodeSpec:
    """One merchant's or region's SuperNode: how it reaches the SuperLink and what it holds.

    ``node_config`` is what ``client/node.py`` reads (``name``, ``data-path``, ``catalogue``,
    ``privacy-policy``, ``state-dir``); ``port`` is the node's own (local) ClientApp API port.
    """

    superlink: str
    root_certificates: Path | None
    private_key: Path | None
    port: int
    node_config: Mapping[str, str]
    host: str = "127.0.0.1"
    insecure: bool = False


def node_config(*, name: str, data_path: str | Path, catalogue: str | Path = "",
                privacy_policy: str | Path = "", state_dir: str | Path = "",
                data_kind: str = "interactions") -> dict[str, str]:
    """The ``--node-config`` values of a deployed node (absolute paths; empty ones left out)."""
    _check_name(name)
    values = {"name": name, "data-path": data_path, "data-kind": data_kind, "catalogue": catalogue,
              "privacy-policy": privacy_policy, "state-dir": state_dir}
    return {k: (str(Path(v).resolve()) if k not in ("name", "data-kind") else str(v))
            for k, v in values.items() if str(v)}


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """``flower-supernode`` for ``spec``: node auth with a key; TLS trusting ``root_certificates`` (the
    deployment's CA; ``None``: the system's trust store) unless ``insecure``."""
    if spec.insecure and spec.root_certificates is not None:
        raise ValueError("a SuperNode is either insecure or given root certificates, not both")
    cmd = [flower_executable("flower-supernode"), "--superlink", spec.superlink,
           "--host", spec.host, "--port", str(spec.port), "--node-config", config_arg(spec.node_config)]
    if spec.root_certificates is not None:
        cmd += ["--root-certificates", str(spec.root_certificates)]
    if spec.insecure:
        cmd.append("--insecure")
    if spec.private_key is not None:
        cmd += ["--auth-supernode-private-key", str(spec.private_key)]
    return cmd


def flower_env(flwr_home: str | Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: ``FLWR_HOME`` (when given), no runtime dependency
    installation, no telemetry or update checks, and this Python's scripts first on PATH."""
    env = dict(os.environ if base is None else base)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.update({"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_federation(flwr_home: str | Path, *, name: str, address: str, root_certificates: str | Path | None,
                     default: bool = True) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``; other entries are kept.

    ``root_certificates`` is the CA certificate (TLS); ``None`` writes ``insecure = true`` (trying
    things on one host only). ``default`` makes it the connection ``flwr`` uses when none is named.
    """
    import tomli_w

    _check_name(name)
    path = Path(flwr_home) / "config.toml"
    doc: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    links = doc.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if default:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def register_command(*, public_key: str | Path, federation: str, name: str) -> list[str]:
    """``flwr supernode register <key.pub> <federation> --name <name>`` (needs the federation entry)."""
    return [flower_executable("flwr"), "supernode", "register", str(public_key), federation, "--name", name]


def run_command(*, app_dir: str | Path, federation: str, run_config: Mapping[str, Any],
                stream: bool = False) -> list[str]:
    """``flwr run <app> <federation> --run-config ...``."""
    cmd = [flower_executable("flwr"), "run", str(app_dir), federation]
    if run_config:
        cmd += ["--run-config", config_arg(run_config)]
    if stream:
        cmd.append("--stream")
    return cmd


# -- supervision -------------------------------------------------------------------------------


FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
"""How Flower reports why it stops: the process itself exits with 1 for every error (``flwr_exit``),
the code (e.g. 305) is only in this log line."""


class Supervisor:
    """Keep one Flower process running: restart it with exponential backoff when it exits.

    The delay before restart ``k`` (after ``k`` consecutive short-lived runs) is
    ``min(initial_backoff * 2**(k-1), max_backoff)``; a run that lasted ``reset_after`` seconds or
    more resets the count. The child's output is copied to ``log_path`` (or this process' stdout)
    and scanned for Flower's ``Exit Code: N`` line: ``N`` (else the process' own exit status) is
    the exit's code. A code in ``permanent`` (a configuration error), an exit with status 0, or
    ``max_restarts`` consecutive failures end supervision; :meth:`stop` (SIGTERM / SIGINT to
    ``fedrec deploy supernode --supervise``) terminates the child and ends it too.
    """

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 log_path: str | Path | None = None, initial_backoff: float = 1.0, max_backoff: float = 60.0,
                 reset_after: float = 120.0, max_restarts: int | None = None,
                 permanent: frozenset[int] = PERMANENT_EXIT_CODES) -> None:
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError(f"backoff must satisfy 0 < initial_backoff <= max_backoff, got "
                             f"initial_backoff={initial_backoff} and max_backoff={max_backoff}")
        if max_restarts is not None and max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts}")
        self.command = list(command)
        self.env = None if env is None else dict(env)
        self.log_path = None if log_path is None else Path(log_path)
        self.initial_backoff, self.max_backoff, self.reset_after = initial_backoff, max_backoff, reset_after
        self.max_restarts = max_restarts
        self.permanent = permanent
        self.exits: list[int] = []  # every child's exit code (Flower's when it logged one), in order
        self.starts = 0
        self.grace = 10.0  # seconds between SIGTERM and SIGKILL in stop()
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive short-lived runs."""
        return min(self.initial_backoff * 2 ** (failures - 1), self.max_backoff)

    def stop(self) -> None:
        """End supervision: terminate the child's process group (it is not restarted)."""
        self._stop.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            # a SuperNode whose SuperLink is gone can hang in shutdown: kill it after a grace period
            def kill() -> None:
                if proc.poll() is None:
                    self._signal_group(proc, signal.SIGKILL)
            threading.Timer(self.grace, kill).start()

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session)
        except ProcessLookupError:
            pass

    @staticmethod
    def _group_members(pgid: int) -> list[int]:
        """PIDs of the live (not zombie) processes in process group ``pgid``."""
        import psutil

        members = []
        for p in psutil.process_iter(["status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                    members.append(p.pid)
            except (OSError, psutil.Error):
                continue
        return members

    def _end_group(self, proc: subprocess.Popen) -> None:
        """Terminate what the child left in its group and wait until it is gone, so that a restart never
        overlaps it (a lingering SuperExec would still hold its port): SIGTERM, up to ``grace`` seconds,
        then SIGKILL and up to ``grace`` more. What survives even that is logged by PID."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._group_members(proc.pid):
                return
            self._signal_group(proc, sig)
            deadline = time.monotonic() + self.grace
            while self._group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        left = self._group_members(proc.pid)
        if left:
            logger.error("processes %s of %s's group survived SIGKILL for %.0f s", left, self.command[0], self.grace)

    def _copy_output(self, proc: subprocess.Popen, sink: Any, found: list[int]) -> None:
        for line in proc.stdout or ():
            sink.write(line)
            sink.flush()
            match = FLOWER_EXIT.search(line.decode("utf-8", "replace"))
            if match:
                found.append(int(match.group(1)))

    def _run_once(self) -> int:
        """Start the child in its own process group, copy its output, wait for it, end what it left.

        A SuperNode starts a SuperExec that outlives it (and keeps its output open); when the
        SuperNode exits, the rest of its group is terminated, and waited for, before the next start.
        """
        sink = self.log_path.open("ab") if self.log_path is not None else sys.stdout.buffer
        found: list[int] = []
        try:
            proc = self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
            self.starts += 1
            reader = threading.Thread(target=self._copy_output, args=(proc, sink, found), daemon=True)
            reader.start()
            status = proc.wait()
            self._end_group(proc)
            reader.join(timeout=self.grace)
        finally:
            if self.log_path is not None:
                sink.close()
        return found[-1] if found and status != 0 else status

    def run(self) -> int:
        """Supervise until stopped or given up; the last exit code (0 when stopped)."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            code = self._run_once()
            self.exits.append(code)
            if self._stop.is_set():
                return 0
            lasted = time.monotonic() - started
            if code == 0:
                logger.info("%s exited normally: supervision ends", self.command[0])
                return 0
            if code in self.permanent:
                logger.error("%s exited with code %d (a configuration error): not restarting", self.command[0], code)
                return code
            failures = 1 if lasted >= self.reset_after else failures + 1
            if self.max_restarts is not None and failures > self.max_restarts:
                logger.error("%s failed %d times in a row (last code %d): giving up", self.command[0], failures, code)
                return code
            wait = self.delay(failures)
            logger.warning("%s exited with code %d after %.1f s; restart %d in %.1f s", self.command[0], code,
                           lasted, failures, wait)
            self._stop.wait(wait)
        return 0


# -- demo data ---------------------------------------------------------------------------------


def write_demo_data(out_dir: str | Path, *, overrides: Sequence[str] = (), max_epsilon: float = 50.0) -> dict[str, Any]:
    """A synthetic log split into one CSV per region (``<region>.csv``, e.g. ``region-0.csv``),
    ``catalogue.txt`` and ``policy.toml``.

    Each file is what one node would hold: its users' interactions (``user,item`` rows, each
    user's oldest first). Returns ``{"catalogue": path, "policy": path, "nodes": {name: path}}``.
    """
    import csv

    from core_model.config import load_config
    from core_model.pipeline import write_catalogue
    from core_model.synthetic import SyntheticConfig, generate_live_commerce

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, overrides)
    log = generate_live_commerce(SyntheticConfig(**cfg.data.synthetic))
    regions = log.user_attributes["region"]
    write_catalogue(log.items, out / "catalogue.txt")
    nodes: dict[str, str] = {}
    for region in sorted({str(r) for r in regions}):
        name = region if region.startswith("region") else f"region-{region}"
        _check_name(name)
        path = out / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user", "item"])
            for u, seq in enumerate(log.sequences):
                if str(regions[u]) == region:
                    writer.writerows((log.users.raw(u), log.items.raw(int(i))) for i in seq.tolist())
        nodes[name] = str(path.resolve())
    policy = out / "policy.toml"
    policy.write_text(f"[policy]\nmax_epsilon = {float(max_epsilon)!r}\n", encoding="utf-8")
    return {"catalogue": str((out / "catalogue.txt").resolve()), "policy": str(policy.resolve()), "nodes": nodes}


# -- one host ------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, *, host: str = "127.0.0.1", timeout: float = 120.0) -> None:
    """Wait until something listens on ``host:port``; an error if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def end_tree(proc: subprocess.Popen, *, grace: float = 5.0, crash: bool = False) -> None:
    """Terminate ``proc`` and every process it started (a SuperLink's SuperExec and ServerApp, a
    SuperNode's SuperExec and ClientApps); kill what is left after ``grace`` seconds. ``crash``:
    SIGKILL them all at once (a host or process crash: no clean-up), as tests of failures do."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        tree = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill() if crash else p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:  # a SuperNode whose SuperLink is gone can hang in shutdown
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    proc.poll()


class LocalFederation:
    """A whole deployment on 127.0.0.1 under one folder, for trying things, tests and benchmarks.

    ``root`` gets ``certs/`` (CA and SuperLink certificate), ``data/`` (:func:`write_demo_data`: one
    file per region), ``keys/``, ``nodes/`` (the nodes' ledgers), ``state/`` (``superlink.db``),
    ``home/`` (``FLWR_HOME`` with the federation ``local``) and one log per process. Every process
    is started on a free port and ended by :meth:`close`.
    """

    FEDERATION = "local"

    def __init__(self, root: str | Path, *, regions: int = 3, demo_overrides: Sequence[str] = (),
                 env_base: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, base=env_base)
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        certs = self.root / "certs"
        create_ca(certs)
        create_server_certificate(certs, ca_dir=certs, names=["localhost", "127.0.0.1"])
        self.demo = write_demo_data(self.root / "data",
                                    overrides=[*demo_overrides, f"data.synthetic.num_regions={regions}"])
        write_federation(self.home, name=self.FEDERATION, address=self.address, root_certificates=certs / CA_CERT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, cmd: list[str], log: str) -> subprocess.Popen:
        """Start ``cmd`` with the federation's environment, its output in ``root/<log>``."""
        with (self.root / log).open("wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> subprocess.Popen:
        """Start the SuperLink (TLS, node auth, ``state/superlink.db``) and wait until it listens."""
        (self.root / "state").mkdir(exist_ok=True)
        proc = self.start(superlink_command(SuperLinkSpec(certs_dir=self.root / "certs", state_dir=self.root / "state",
                                                          port=self.port)), "superlink.log")
        wait_for_port(self.port, proc)
        return proc

    def register(self, names: Sequence[str]) -> None:
        """Make each node's key pair and register it (in parallel: each ``flwr`` call is a Python start-up)."""
        pending = []
        for name in names:
            _, public = create_node_key(self.root / "keys", name)
            pending.append(subprocess.Popen(register_command(public_key=public, federation=self.FEDERATION,
                                                             name=name),
                                            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for name, proc in zip(names, pending):
            out, _ = proc.communicate(timeout=180)
            if proc.returncode != 0 or b"registered successfully" not in out:
                raise RuntimeError(f"registering {name} failed: {out.decode(errors='replace')[-2000:]}")

    def node_command(self, name: str, *, data: str, ca: bool = True) -> list[str]:
        """The SuperNode command of node ``name`` holding ``data`` (``ca=False``: without the CA)."""
        values = node_config(name=name, data_path=data, catalogue=self.demo["catalogue"],
                             privacy_policy=self.demo["policy"], state_dir=self.root / "nodes")
        return supernode_command(SuperNodeSpec(
            superlink=self.address, root_certificates=self.root / "certs" / CA_CERT if ca else None,
            private_key=self.root / "keys" / f"{name}.key", port=free_port(), node_config=values))

    def start_node(self, name: str) -> subprocess.Popen:
        """Start the SuperNode of demo region ``name`` (its log: ``root/<name>.log``)."""
        return self.start(self.node_command(name, data=self.demo["nodes"][name]), f"{name}.log")

    def launch(self, app_dir: str | Path, run_config: Mapping[str, Any]) -> subprocess.CompletedProcess:
        """``flwr run`` the app in ``app_dir`` on this federation (returns once the run is submitted)."""
        return subprocess.run(run_command(app_dir=app_dir, federation=self.FEDERATION, run_config=run_config),
                              env=self.env, capture_output=True, text=True, timeout=180, check=False)

    def close(self) -> None:
        """End every process this federation started, newest first."""
        for proc in reversed(self.procs):
            end_tree(proc)


# -- command line ------------------------------------------------------------------------------


def _exec(cmd: list[str], env: Mapping[str, str]) -> int:
    """Replace this process with ``cmd`` (its PID stays the one the operator started)."""
    logger.info("exec %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, dict(env))
    return 0  # not reached


def _run(cmd: list[str], env: Mapping[str, str]) -> int:
    logger.info("run %s", " ".join(cmd))
    return subprocess.run(cmd, env=dict(env), check=False).returncode


def cmd_certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (out / CA_CERT).exists() or args.new_ca:
        create_ca(out, common_name=args.ca_name)
    cert, key = create_server_certificate(out, ca_dir=out, names=args.name)
    print(f"CA {out / CA_CERT}; SuperLink certificate {cert} (SANs: {', '.join(args.name)}), key {key}")
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    private, public = create_node_key(args.out, args.name)
    print(f"private key {private} (keep it on the node); public key {public} (register it)")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(SuperLinkSpec(certs_dir=Path(args.certs), state_dir=state, host=args.host,
                                          port=args.port, node_auth=not args.no_node_auth))
    return _exec(cmd, flower_env(args.flwr_home))


def cmd_federation(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = write_federation(home, name=args.name, address=args.address,
                            root_certificates=None if args.insecure else args.ca)
    print(f"wrote [superlink.{args.name}] (address {args.address}) to {path}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    return _run(register_command(public_key=args.key, federation=args.federation, name=args.name),
                flower_env(args.flwr_home))


def cmd_supernode(args: argparse.Namespace) -> int:
    values = node_config(name=args.name, data_path=args.data, catalogue=args.catalogue or "",
                         privacy_policy=args.policy or "", state_dir=args.state_dir or "", data_kind=args.data_kind)
    spec = SuperNodeSpec(superlink=args.superlink, root_certificates=Path(args.ca) if args.ca else None,
                         private_key=Path(args.key) if args.key else None, port=args.port, node_config=values,
                         insecure=args.insecure)
    cmd, env = supernode_command(spec), flower_env(args.flwr_home)
    if not args.supervise:
        return _exec(cmd, env)
    sup = Supervisor(cmd, env=env, initial_backoff=args.backoff, max_backoff=args.max_backoff,
                     log_path=args.log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop())
    return sup.run()


def cmd_run(args: argparse.Namespace) -> int:
    from core_model.config import parse_override
    run_config: dict[str, Any] = {}
    for item in args.overrides:
        keys, value = parse_override(item)
        run_config[".".join(k.replace("_", "-") for k in keys)] = value  # Flower matches declared (kebab) keys
    return _run(run_command(app_dir=args.app, federation=args.federation, run_config=run_config,
                            stream=args.stream), flower_env(args.flwr_home))


def cmd_demo_data(args: argparse.Namespace) -> int:
    made = write_demo_data(args.out, overrides=args.overrides)
    print(json.dumps(made, indent=2))
    return 0


def add_deploy_parser(sub: Any) -> None:
    """Add ``fedrec deploy <command>`` to the ``fedrec`` subcommands ``sub``."""
    deploy = sub.add_parser("deploy", help="deployment: certificates, keys, SuperLink, SuperNodes, runs")
    cmds = deploy.add_subparsers(dest="deploy_command", required=True)

    def home(p: argparse.ArgumentParser) -> None:
        p.add_argument("--flwr-home", help="FLWR_HOME for the Flower processes (default: $FLWR_HOME or ~/.flwr)")

    p = cmds.add_parser("certs", help="a CA (kept if present) and the SuperLink's TLS certificate")
    p.add_argument("--out", required=True, type=Path, help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--name", action="append", required=True,
                   help="a host name or IP address of the SuperLink (repeatable; each becomes a SAN)")
    p.add_argument("--ca-name", default="fedrec deployment CA", help="the CA's common name")
    p.add_argument("--new-ca", action="store_true", help="replace an existing CA")
    p.set_defaults(func=cmd_certs)

    p = cmds.add_parser("node-key", help="an ECDSA P-384 key pair (OpenSSH format) for one SuperNode")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", required=True, help="the node's name, e.g. merchant-0 or region-eu")
    p.set_defaults(func=cmd_node_key)

    p = cmds.add_parser("superlink", help="start a SuperLink (TLS, node auth, state database)")
    p.add_argument("--certs", required=True, type=Path, help="folder from `fedrec deploy certs`")
    p.add_argument("--state-dir", required=True, type=Path, help="folder of the state database superlink.db")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9093, help="the one port for the Fleet, Control and Runtime APIs")
    p.add_argument("--no-node-auth", action="store_true", help="admit any node with the CA (not recommended)")
    home(p)
    p.set_defaults(func=cmd_superlink)

    p = cmds.add_parser("federation", help="write the federation's entry in $FLWR_HOME/config.toml")
    p.add_argument("--name", required=True, help="the federation (connection) name, e.g. production")
    p.add_argument("--address", required=True, help="SuperLink host:port")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ca", type=Path, help="the CA certificate (ca.crt)")
    g.add_argument("--insecure", action="store_true", help="no TLS (single-host trials only)")
    home(p)
    p.set_defaults(func=cmd_federation)

    p = cmds.add_parser("register", help="admit a node's public key to the federation")
    p.add_argument("--key", required=True, type=Path, help="the node's public key (<name>.pub)")
    p.add_argument("--name", required=True, help="the node's name")
    p.add_argument("--federation", required=True, help="the federation entry in $FLWR_HOME/config.toml")
    home(p)
    p.set_defaults(func=cmd_register)

    p = cmds.add_parser("supernode", help="start the SuperNode of one merchant or region")
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ca", type=Path, help="the deployment's CA certificate (default: the system's trust store)")
    g.add_argument("--insecure", action="store_true", help="no TLS (single-host trials without node auth only)")
    p.add_argument("--key", type=Path, help="the node's private key (<name>.key)")
    p.add_argument("--port", type=int, default=9094, help="the node's local ClientApp API port")
    p.add_argument("--name", required=True, help="the client's name (its ledger's folder)")
    p.add_argument("--data", required=True, help="the node's own interaction log")
    p.add_argument("--data-kind", default="interactions", help="format of --data (default interactions)")
    p.add_argument("--catalogue", help="the public item catalogue (default: the run config's data.catalogue)")
    p.add_argument("--policy", help="the operator's privacy policy (TOML; overrides the run config's)")
    p.add_argument("--state-dir", help="folder of the node's privacy ledger (overrides the run config's)")
    p.add_argument("--supervise", action="store_true", help="restart the node with backoff when it exits")
    p.add_argument("--backoff", type=float, default=1.0, help="first restart delay, seconds (doubles)")
    p.add_argument("--max-backoff", type=float, default=60.0, help="longest restart delay, seconds")
    p.add_argument("--log", type=Path, help="append the node's output to this file (with --supervise)")
    home(p)
    p.set_defaults(func=cmd_supernode)

    p = cmds.add_parser("run", help="launch a run against a federation (flwr run)")
    p.add_argument("--federation", required=True)
    p.add_argument("--app", default=".", type=Path, help="the fedrec project folder (pyproject.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="run config override, e.g. --set federation.num-rounds=5 (repeatable)")
    p.add_argument("--stream", action="store_true", help="follow the run's logs")
    home(p)
    p.set_defaults(func=cmd_run)

    p = cmds.add_parser("demo-data", help="synthetic per-region node files, catalogue and policy for a trial")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set data.synthetic.num_regions=3")
    p.set_defaults(func=cmd_demo_data)
