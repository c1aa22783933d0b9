"""server/deploy.py and client/node.py without Flower processes: keys, certificates, commands, supervisor."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import sys
import threading
import time
import tomllib

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from client.node import NodeSettings, node_client_data
from core_model.config import ExperimentConfig
from core_model.pipeline import read_catalogue
from server import deploy


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    deploy.create_ca(out)
    deploy.create_server_certificate(out, ca_dir=out, names=["localhost", "127.0.0.1", "link.example"])
    return out


def test_server_certificate_is_signed_by_the_ca_with_the_given_sans(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key().curve, ec.SECP384R1)
    for secret in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / secret).stat().st_mode) == 0o600


def test_tls_handshake_trusts_the_ca_and_nothing_else(certs):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        trusting = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None
        system_only = ssl.create_default_context()  # a node without the deployment's CA
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                system_only.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(timeout=5)
        listener.close()


def test_node_key_is_p384_in_the_openssh_formats_flower_reads(tmp_path):
    private, public = deploy.create_node_key(tmp_path, "merchant-0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().endswith(" merchant-0\n")
    assert try_load_public_key(public)  # what `flwr supernode register` does with the file
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="name must be"):
        deploy.create_node_key(tmp_path, "../evil")


def test_node_config_survives_flowers_parser_and_settings_validate(tmp_path):
    values = deploy.node_config(name="region-eu", data_path=tmp_path / "eu.csv", catalogue=tmp_path / "c.txt",
                                privacy_policy=tmp_path / "p.toml", state_dir=tmp_path / "state")
    parsed = parse_config_args([deploy.config_arg(values)])
    settings = NodeSettings.from_node_config(parsed)
    assert settings == NodeSettings(name="region-eu", data_path=str(tmp_path / "eu.csv"),
                                    catalogue=str(tmp_path / "c.txt"), privacy_policy=str(tmp_path / "p.toml"),
                                    state_dir=str(tmp_path / "state"))
    with pytest.raises(ValueError, match="unknown node config key"):
        NodeSettings.from_node_config({**parsed, "partition-id": 0})
    with pytest.raises(ValueError, match="data-path is required"):
        NodeSettings.from_node_config({"name": "x"})
    with pytest.raises(ValueError, match="may not contain"):
        deploy.config_arg({"name": 'a"b'})
    assert deploy.config_arg({"a": 1, "b": True, "c": 0.5}) == "a=1 b=true c=0.5"


def test_the_nodes_policy_and_ledger_win_over_the_run_config():
    cfg = ExperimentConfig()
    from dataclasses import replace
    cfg = replace(cfg, privacy=replace(cfg.privacy, policy="/server/lax.toml", state_dir="/server/state"))
    node = NodeSettings(name="m", data_path="/d.csv", privacy_policy="/node/policy.toml", state_dir="/node/state",
                        catalogue="/node/catalogue.txt")
    applied = node.apply(cfg)
    assert (applied.privacy.policy, applied.privacy.state_dir) == ("/node/policy.toml", "/node/state")
    assert applied.data.catalogue == "/node/catalogue.txt"
    assert NodeSettings(name="m", data_path="/d.csv").apply(cfg).privacy.policy == "/server/lax.toml"


def test_node_data_is_indexed_by_the_catalogue(tmp_path):
    (tmp_path / "catalogue.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "node.csv").write_text("user,item\nu1,c\nu1,a\nu1,d\nu2,b\nu2,b\nu2,c\nu2,a\n")
    data = node_client_data(ExperimentConfig(), NodeSettings(name="n", data_path=str(tmp_path / "node.csv"),
                                                             catalogue=str(tmp_path / "catalogue.txt")))
    assert data.num_items == 4 and data.name == "n" and len(data.split) == 2
    # u1 = c a | d -> test target d = 4 with input (3, 1); indices come from the catalogue, not the node's own items
    test_targets = sorted(int(t) for t in data.split.test_targets)
    assert test_targets == [1, 4]
    (tmp_path / "bad.csv").write_text("user,item\nu1,a\nu1,b\nu1,zzz\n")
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        node_client_data(ExperimentConfig(), NodeSettings(name="n", data_path=str(tmp_path / "bad.csv"),
                                                          catalogue=str(tmp_path / "catalogue.txt")))


def test_catalogue_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "c.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"c.txt:2: empty item id"):
        read_catalogue(tmp_path / "c.txt")
    with pytest.raises(ValueError, match="data.catalogue is empty"):
        read_catalogue("")


def test_write_federation_keeps_other_entries_and_flower_reads_it(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('[superlink.other]\naddress = "10.0.0.1:9093"\ninsecure = true\n')
    deploy.write_federation(tmp_path, name="prod", address="127.0.0.1:9093", root_certificates=tmp_path / "ca.crt")
    doc = tomllib.loads((tmp_path / "config.toml").read_text())
    assert doc["superlink"]["default"] == "prod"
    assert doc["superlink"]["other"]["address"] == "10.0.0.1:9093"
    assert doc["superlink"]["prod"] == {"address": "127.0.0.1:9093", "root-certificates": str(tmp_path / "ca.crt")}
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    from flwr.cli.flower_config import read_superlink_connection
    conn = read_superlink_connection("prod")
    assert conn.address == "127.0.0.1:9093" and conn.root_certificates == str(tmp_path / "ca.crt")


def test_commands_carry_tls_auth_database_and_no_dependency_installation(tmp_path):
    link = deploy.superlink_command(deploy.SuperLinkSpec(certs_dir=tmp_path, state_dir=tmp_path / "s", port=1234))
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in link
    assert link[link.index("--database") + 1] == str(tmp_path / "s" / "superlink.db")
    assert link[link.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    assert "--insecure" not in link
    node = deploy.supernode_command(deploy.SuperNodeSpec(
        superlink="127.0.0.1:1234", root_certificates=tmp_path / "ca.crt", private_key=tmp_path / "k.key",
        port=5678, node_config={"name": "m", "data-path": "/d.csv"}))
    assert node[node.index("--node-config") + 1] == 'name="m" data-path="/d.csv"'
    assert "--insecure" not in node and node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k.key")
    env = deploy.flower_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_HOME"] == str(tmp_path)
    run = deploy.run_command(app_dir=".", federation="prod", run_config={"federation.num-rounds": 2})
    assert run[-2:] == ["--run-config", "federation.num-rounds=2"]


def test_demo_data_splits_users_by_region_with_one_catalogue(tmp_path):
    made = deploy.write_demo_data(tmp_path, overrides=["data.synthetic.num_users=60", "data.synthetic.num_items=20",
                                                       "data.synthetic.num_regions=3", "data.synthetic.min_length=4",
                                                       "data.synthetic.max_length=8"])
    assert sorted(made["nodes"]) == ["region-0", "region-1", "region-2"]
    users = [{line.split(",")[0] for line in open(p).read().splitlines()[1:]} for p in made["nodes"].values()]
    assert sum(len(u) for u in users) == 60 and len(set().union(*users)) == 60
    assert len(read_catalogue(made["catalogue"])) == 20
    assert "max_epsilon" in open(made["policy"]).read()


# -- supervisor --------------------------------------------------------------------------------

FLAKY = """
import pathlib, sys
count = pathlib.Path(sys.argv[1])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print("ERROR :     Exit Code: " + sys.argv[3], flush=True)
    sys.exit(1)
print("connected", flush=True)
"""


def test_backoff_doubles_up_to_the_cap():
    sup = deploy.Supervisor(["x"], initial_backoff=0.5, max_backoff=3.0)
    assert [sup.delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="initial_backoff"):
        deploy.Supervisor(["x"], initial_backoff=2.0, max_backoff=1.0)


def test_supervisor_restarts_on_connection_errors_with_backoff(tmp_path):
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    sup = deploy.Supervisor([sys.executable, str(script), str(tmp_path / "n"), "2", "305"],
                            log_path=tmp_path / "log", initial_backoff=0.2, max_backoff=1.0)
    t0 = time.monotonic()
    assert sup.run() == 0
    assert sup.exits == [305, 305, 0] and sup.starts == 3
    assert time.monotonic() - t0 >= 0.2 + 0.4  # waited 0.2 s, then 0.4 s
    assert (tmp_path / "log").read_text().count("Exit Code: 305") == 2


def test_supervisor_gives_up_on_a_configuration_error(tmp_path):
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    sup = deploy.Supervisor([sys.executable, str(script), str(tmp_path / "n"), "5", "303"],
                            log_path=tmp_path / "log", initial_backoff=0.05)
    assert sup.run() == 303 and sup.starts == 1


def test_supervisor_max_restarts_and_stop(tmp_path):
    sup = deploy.Supervisor([sys.executable, "-c", "raise SystemExit(3)"], log_path=tmp_path / "log",
                            initial_backoff=0.01, max_backoff=0.01, max_restarts=2)
    assert sup.run() == 3 and sup.exits == [3, 3, 3]
    sleeper = deploy.Supervisor([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "log")
    threading.Timer(0.5, sleeper.stop).start()
    t0 = time.monotonic()
    assert sleeper.run() == 0 and sleeper.starts == 1
    assert time.monotonic() - t0 < 15


def test_supervisor_ends_what_the_child_left_behind(tmp_path):
    # like a SuperNode: the child starts a long-lived helper that keeps the output open, then fails
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, sys\n"
        "helper = subprocess.Popen([sys.executable, '-c',\n"
        "                           'import time; print(\"helper\", flush=True); time.sleep(60)'])\n"
        "open(sys.argv[1], 'w').write(str(helper.pid))\n"
        "print('ERROR :     Exit Code: 305', flush=True)\n"
        "sys.exit(1)\n")
    sup = deploy.Supervisor([sys.executable, str(child), str(tmp_path / "helper.pid")], log_path=tmp_path / "log",
                            initial_backoff=0.05, max_restarts=0)
    sup.grace = 2.0
    t0 = time.monotonic()
    assert sup.run() == 305
    assert time.monotonic() - t0 < 20
    helper = int((tmp_path / "helper.pid").read_text())

    def gone() -> bool:
        try:
            return not psutil.pid_exists(helper) or psutil.Process(helper).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # the group was signalled when the child exited; dying takes the helper a moment (it would
    # sleep 60 s if nobody signalled it)
    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()


def test_supervisor_waits_for_the_group_before_a_restart(tmp_path):
    # a helper that ignores SIGTERM and does not hold the output open: when run() returns it must be
    # gone (killed after the grace period), not left running beside the next start
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, sys\n"
        "helper = subprocess.Popen([sys.executable, '-c',\n"
        "                           'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '\n"
        "                           'open(\"' + sys.argv[2] + '\", \"w\").close(); time.sleep(60)'],\n"
        "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "open(sys.argv[1], 'w').write(str(helper.pid))\n"
        "import os, time\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.01)  # the helper ignores SIGTERM from here on\n"
        "sys.exit(1)\n")
    sup = deploy.Supervisor([sys.executable, str(child), str(tmp_path / "helper.pid"), str(tmp_path / "ready")],
                            log_path=tmp_path / "log", initial_backoff=0.05, max_restarts=0)
    sup.grace = 1.0
    t0 = time.monotonic()
    assert sup.run() == 1
    waited = time.monotonic() - t0
    helper = int((tmp_path / "helper.pid").read_text())
    try:
        alive = psutil.Process(helper).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert not alive, "the helper outlived run(): a restart would have overlapped it"
    assert waited >= 1.0  # it survived SIGTERM, so the supervisor waited out the grace period before SIGKILL
