"""TFF workers on "separate hosts": each in its own network namespace, joined to the host by a veth pair
with a private subnet (10.213.k.0/24: host side .1, worker .2), so the driver (this pytest process, in
the host's namespace) reaches them over distinct interfaces as it would other machines. Root only, and
slow: `pytest -m slow tests/test_netns_workers.py` or `make test-all` (docs/workers.md).

Shown: the same FedKL rounds give the same result as on TFF's local context, over the veths (both ends
of the TCP connections, and the interfaces' byte counters); a worker is not reachable through the
host's loopback nor from a third namespace attached to the host (with IP forwarding off), only from
the driver. Every namespace, veth and worker is removed by the test, also when it fails. Traffic goes
only to loopback and to addresses inside these namespaces.
"""

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import types

import portpicker
import psutil
import pytest

from tests.helpers import assert_same_fedkl_results, fedkl_rounds, start_worker
from tff_programs import contexts

SUBNETS = "10.213.0.0/16"  # 10.213.k.0/24 for k = 1, 2 (workers), 3 (outsider)
_CONNECT_TIMEOUT = 2.0  # seconds, for every probe connection


def netns_unavailable():
    """Why this machine cannot run the namespace tests (a skip reason), or None. Tries to create a
    namespace with a veth pair, rather than trusting the user id alone."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and veth pairs; run as root, e.g. in CI)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = Namespace("probe", 0)
    try:
        probe.create(configure=False)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace with a veth pair: `{' '.join(e.cmd)}`: {e.stderr.strip()}"
    finally:
        probe.delete()
    return None


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Namespace:
    """A network namespace `tfkl-ROLE-PID` joined to the host by the veth pair `tfklK-PID` (host side,
    K.1/24 of 10.213.K) / `eth0` (inside, 10.213.K.2/24). IPv6 is off on both ends (IPv4 only: no
    link-local traffic); `lo` is up inside."""

    def __init__(self, role, k, route=None):
        pid = os.getpid()
        self.name = f"tfkl-{role}-{pid}"
        self.host_if = f"tfkl{k}-{pid}"  # at most 15 characters (pids < 2**22)
        self.host_address = f"10.213.{k}.1"
        self.address = f"10.213.{k}.2"
        self.route = route  # a prefix routed inside via the host side, e.g. SUBNETS

    def exec_prefix(self):
        return ["ip", "netns", "exec", self.name]

    def create(self, configure=True):
        """Creates the namespace and the veth pair; with `configure`, also addresses, routes and links up."""
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        if not configure:
            return
        host_ipv6 = f"/proc/sys/net/ipv6/conf/{self.host_if}/disable_ipv6"
        if os.path.exists(host_ipv6):
            with open(host_ipv6, "w") as f:
                f.write("1")
        subprocess.run(
            [*self.exec_prefix(), "sh", "-c", 'test ! -e "$1" || echo 1 > "$1"', "sh"]
            + ["/proc/sys/net/ipv6/conf/eth0/disable_ipv6"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (
            ["link", "set", "lo", "up"],
            ["addr", "add", f"{self.address}/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
        ) + ((["route", "add", self.route, "via", self.host_address],) if self.route else ()):
            _ip("-n", self.name, *args)

    def delete(self):
        """Removes the veth pair and the namespace (no error if they are already gone)."""
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)

    def exists(self):
        return self.name in _ip("netns", "list").stdout.split() or os.path.exists(f"/sys/class/net/{self.host_if}")

    def counters(self):
        """(bytes sent, bytes received) by the host side of the veth."""
        stats = f"/sys/class/net/{self.host_if}/statistics"
        return tuple(int(open(f"{stats}/{kind}_bytes").read()) for kind in ("tx", "rx"))


# One TCP connection attempt to argv[1]:argv[2] with a timeout of argv[3] s; prints its outcome.
_CONNECT_SCRIPT = (
    "import os, socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "    print('connected')\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except TimeoutError:\n"
    "    print('timeout')\n"
    "except OSError as e:\n"
    "    print(os.strerror(e.errno) if e.errno else repr(e))\n"
    "s.close()\n"
)


def connect_outcome(host, port, namespace=None, timeout=_CONNECT_TIMEOUT):
    """One TCP connection attempt to host:port from the host's namespace, or from inside `namespace` (a
    Namespace), by a small Python process: 'connected', 'refused', 'timeout' or the error's text."""
    prefix = namespace.exec_prefix() if namespace else []
    result = subprocess.run(
        [*prefix, sys.executable, "-I", "-c", _CONNECT_SCRIPT, host, str(port), str(timeout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def established_peers(pid, port):
    """Remote IPv4 addresses of the ESTABLISHED TCP connections to local `port`, as the process `pid` sees
    them in its own network namespace (/proc/PID/net/tcp and tcp6; IPv4 peers of an IPv6 socket are
    IPv4-mapped)."""
    peers = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            local_port, remote, state = row[1].split(":")[1], row[2].split(":")[0], row[3]
            if state != "01" or int(local_port, 16) != port:
                continue
            raw = b"".join(struct.pack("<I", int(remote[i : i + 8], 16)) for i in range(0, len(remote), 8))
            peers.append(_unmapped(ipaddress.ip_address(raw)))
    return peers


def _unmapped(address):
    """'10.0.0.1' for an IPv4 address, also when IPv4-mapped in IPv6 ('::ffff:10.0.0.1')."""
    address = ipaddress.ip_address(address)
    return str(getattr(address, "ipv4_mapped", None) or address)


@pytest.fixture(scope="module")
def netns_workers(tmp_path_factory):
    """Two TFF workers, each in its own namespace (tfkl-w1-PID, tfkl-w2-PID), on the same port P, which
    is also held (bound, not listening) on the host so nothing there answers on it. Yields an object
    with `namespaces`, `processes`, `port`, `addresses`. Stops the workers by PID (SIGTERM, then
    SIGKILL) and removes the veths and namespaces, however the tests end."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    used = _ip("-4", "route", "show", "root", SUBNETS).stdout.strip()
    if used:
        pytest.fail(
            f"{SUBNETS} is already routed on this host (another run, or leftovers of a killed one: see "
            f"`ip netns list` and `ip link`; stop the namespace's processes, `ip netns pids NAME`, then "
            f"`ip netns del NAME` and `ip link del tfklK-PID`):\n{used}"
        )
    port = portpicker.pick_unused_port()
    host_hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host_hold.bind(("0.0.0.0", port))
    logs = tmp_path_factory.mktemp("netns_workers")
    namespaces = [Namespace(f"w{k}", k) for k in (1, 2)]
    processes = []
    workers = types.SimpleNamespace(
        namespaces=namespaces, processes=processes, port=port, addresses=[f"{ns.address}:{port}" for ns in namespaces]
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY"):
                env.delenv(name, raising=False)  # gRPC would send the driver's connections to a proxy
            for ns in namespaces:
                ns.create()
                processes.append(start_worker(port, logs / f"{ns.name}.log", prefix=ns.exec_prefix()))
            for ns, address, process in zip(namespaces, workers.addresses, processes):
                try:
                    contexts.connect(address, timeout=60).close()
                except contexts.WorkerUnavailableError:
                    log = (logs / f"{ns.name}.log").read_text()
                    pytest.fail(f"worker {address} (exit code {process.poll()}) did not start:\n{log}")
            yield workers
    finally:
        try:
            contexts.install_context(workers=[])
            contexts.shutdown()
            running = []
            for process in processes:
                try:
                    running.append(psutil.Process(process.pid))
                except psutil.NoSuchProcess:
                    pass
            contexts.stop_processes(running)  # SIGTERM, SIGKILL after 10 s
            for process in processes:
                process.wait(timeout=30)
        finally:
            for ns in namespaces:
                ns.delete()
            host_hold.close()
        left = [ns.name for ns in namespaces if ns.exists()]
        assert not left, f"namespaces or veths left behind: {left}"


def test_skip_reason_without_root(monkeypatch):
    """The namespace tests skip, naming why, where they cannot run (here: a non-root user); nothing is
    created."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert netns_unavailable() == "needs root (creates network namespaces and veth pairs; run as root, e.g. in CI)"


@pytest.mark.slow
def test_fedkl_rounds_on_workers_in_namespaces_match_local(netns_workers):
    """Two FedKL rounds over the veths: same shared weights and each client's own state as locally; the
    driver's gRPC connections run between 10.213.k.1 (host side) and 10.213.k.2:P (the worker), and the
    driver itself listens on no port."""
    before = [ns.counters() for ns in netns_workers.namespaces]
    results = fedkl_rounds({"local": [], "2 workers in namespaces": netns_workers.addresses})
    after = [ns.counters() for ns in netns_workers.namespaces]
    max_diff = assert_same_fedkl_results(results["2 workers in namespaces"], results["local"])
    print(f"\nmax |w - w_local| over the shared weights: {max_diff:.3g}")

    port = netns_workers.port
    connections = psutil.Process().net_connections(kind="inet")
    driver = [  # gRPC's sockets are IPv6, their IPv4 peers IPv4-mapped
        (_unmapped(c.laddr.ip), _unmapped(c.raddr.ip), c.raddr.port)
        for c in connections
        if c.status == psutil.CONN_ESTABLISHED and c.raddr
    ]
    assert not [c for c in connections if c.status == psutil.CONN_LISTEN]  # the driver serves no port
    for ns, process, b, a in zip(netns_workers.namespaces, netns_workers.processes, before, after):
        # The driver's end: from the host side of this worker's veth to the worker's address.
        assert (ns.host_address, ns.address, port) in driver, driver
        assert not [d for d in driver if d[1:] == ("127.0.0.1", port)]
        # The worker's end, in its namespace: every peer is the host side of its veth, none is loopback.
        peers = established_peers(process.pid, port)
        assert peers and set(peers) == {ns.host_address}, peers
        # The round's data went over this veth, both ways.
        sent, received = a[0] - b[0], a[1] - b[1]
        print(f"{ns.host_if}: {sent} bytes to {ns.name}, {received} bytes back")
        assert sent > 100_000 and received > 100_000


@pytest.mark.slow
def test_worker_is_not_on_the_hosts_interfaces(netns_workers):
    """The worker's port answers only on its namespace's address: not on the host's loopback, nor on the
    host's own address on the worker's link (the host exposes no worker port); the driver reaches it."""
    port = netns_workers.port
    outcomes = {"127.0.0.1": connect_outcome("127.0.0.1", port)}
    for ns in netns_workers.namespaces:
        outcomes[ns.host_address] = connect_outcome(ns.host_address, port)
        outcomes[ns.address] = connect_outcome(ns.address, port)
    print(f"\nfrom the host, port {port}: {outcomes}")
    assert outcomes == {
        "127.0.0.1": "refused",
        "10.213.1.1": "refused",
        "10.213.1.2": "connected",
        "10.213.2.1": "refused",
        "10.213.2.2": "connected",
    }


@pytest.mark.slow
def test_outsider_namespace_cannot_reach_a_worker(netns_workers):
    """A third namespace attached to the host by its own veth (10.213.3.0/24), with a route to the
    workers' subnets through the host, reaches the host but no worker: the host does not forward
    (net.ipv4.ip_forward = 0, checked, never changed). The driver, on the host, reaches them."""
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        if f.read().strip() != "0":
            pytest.skip("the host forwards IPv4 (net.ipv4.ip_forward=1): left as it is, so this check cannot hold")
    port = netns_workers.port
    outsider = Namespace("out", 3, route=SUBNETS)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        outsider.create()
        # Control: the outsider's link works (it reaches a listener on the host's side of its veth).
        listener.bind((outsider.host_address, 0))
        listener.listen(1)
        control = connect_outcome(outsider.host_address, listener.getsockname()[1], outsider)
        outcomes = {
            host: connect_outcome(host, port, outsider)
            for ns in netns_workers.namespaces
            for host in (ns.address, ns.host_address)
        }
    finally:
        listener.close()
        outsider.delete()
    print(f"\nfrom {outsider.name}: host listener {control}; port {port}: {outcomes}")
    assert control == "connected"
    for ns in netns_workers.namespaces:
        assert outcomes[ns.address] != "connected"  # dropped by the host ('timeout')
        assert outcomes[ns.host_address] == "refused"  # the host's own address: no worker there
        assert connect_outcome(ns.address, port) == "connected"
    assert not outsider.exists()
