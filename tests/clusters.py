"""Broker clusters the fault tests start themselves: on loopback ports, in a temporary directory,
stopped by the PIDs started here and removed afterwards. Never touches the machine's servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout}s")
        time.sleep(0.02)


@dataclass
class Node:
    name: str
    argv: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    monitor_port: int = 0
    env: dict[str, str] | None = None


@dataclass
class ProcessGroup:
    """Server processes this test run started, by name; stop() ends exactly those PIDs."""

    label: str
    root: str = field(default="")
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix=f"cachesync-{self.label}-")

    def path(self, *parts: str) -> str:
        full = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def add(self, name: str, argv: Sequence[str], port: int) -> Node:
        node = self.nodes[name] = Node(name, list(argv), port)
        return node

    def start(self, name: str, wait: bool = True) -> Node:
        node = self.nodes[name]
        log = open(self.path("logs", f"{name}.log"), "ab")  # noqa: SIM115 - the child owns it
        try:
            node.process = subprocess.Popen(
                node.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=node.env,
            )
        finally:
            log.close()
        if wait:
            wait_until(lambda: port_open(node.port), 10.0, f"{self.label} node {name}")
        return node

    def kill(self, name: str) -> None:
        """SIGKILL the node (a crash), and reap it."""
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(5)

    def alive(self, name: str) -> bool:
        process = self.nodes[name].process
        return process is not None and process.poll() is None

    def stop(self) -> None:
        for node in self.nodes.values():
            process = node.process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for node in self.nodes.values():
            process = node.process
            if process is None:
                continue
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.path("logs", f"{name}.log"), errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""


def nats_cluster(size: int = 3) -> ProcessGroup:
    """A JetStream cluster of ``size`` nats-server nodes; client ports in ``.nodes[*].port``."""
    group = ProcessGroup("nats")
    ports = free_ports(3 * size)
    client, route, monitor = ports[:size], ports[size : 2 * size], ports[2 * size :]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route)
    for i in range(size):
        name = f"n{i + 1}"
        argv = [
            "nats-server",
            "-a", "127.0.0.1",
            "-p", str(client[i]),
            "-m", str(monitor[i]),
            "-n", name,
            "-js",
            "-sd", group.path(name, "data", "x")[:-2],
            "--cluster_name", "cachesync-test",
            "--cluster", f"nats://127.0.0.1:{route[i]}",
            "--routes", routes,
        ]  # fmt: skip
        group.add(name, argv, client[i]).monitor_port = monitor[i]
    try:
        for name in group.nodes:
            group.start(name, wait=False)
        for node in group.nodes.values():
            wait_until(lambda node=node: port_open(node.port), 10.0, f"nats node {node.name}")
    except BaseException:
        group.stop()
        raise
    return group


def redis_server_argv(group: ProcessGroup, name: str, port: int, *extra: str) -> list[str]:
    """A throw-away redis-server on loopback: no persistence, its own directory."""
    directory = os.path.dirname(group.path(name, "x"))
    return [
        "redis-server",
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", directory,
        "--save", "",
        "--appendonly", "no",
        "--repl-diskless-sync", "yes",
        "--repl-diskless-sync-delay", "0",
        *extra,
    ]  # fmt: skip


@dataclass
class SentinelDeployment:
    """A master, a replica and 3 sentinels watching them as ``service``."""

    group: ProcessGroup
    sentinel_ports: list[int]
    service: str = "mymaster"

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def master_port(self) -> int:
        import redis

        for port in self.sentinel_ports:
            try:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
                try:
                    _, master_port = client.sentinel_get_master_addr_by_name(self.service)
                    return int(master_port)
                finally:
                    client.close()
            except redis.ConnectionError:
                continue
        raise RuntimeError("no sentinel answered")

    def node_at(self, port: int) -> str:
        return next(node.name for node in self.group.nodes.values() if node.port == port)

    def settled(self) -> bool:
        """Every sentinel knows the replica and the other sentinels (so they can fail over)."""
        import redis

        for port in self.sentinel_ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
            try:
                master = client.sentinel_master(self.service)
                if master.get("num-other-sentinels", 0) < len(self.sentinel_ports) - 1:
                    return False
                if master.get("num-slaves", 0) < 1 or master.get("flags") != "master":
                    return False
                if not self.group.alive(self.node_at(int(master["port"]))):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        replicas = [
            node
            for node in self.group.nodes.values()
            if node.name.startswith("redis") and self.group.alive(node.name)
        ]
        return len(replicas) >= 2 and self._replica_linked()

    def _replica_linked(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.master_port(), socket_timeout=1.0)
        try:
            info = client.info("replication")
            return bool(info.get("connected_slaves", 0) >= 1) and all(
                info.get(f"slave{i}", {}).get("state") == "online"
                for i in range(int(info.get("connected_slaves", 0)))
            )
        except redis.RedisError:
            return False
        finally:
            client.close()

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a killed Redis node again, as a replica of the current master (the sentinels
        would convert it too, but only after about 8 s); ``wait`` until all is settled."""
        if not self.group.alive(name):
            node = self.group.nodes[name]
            argv = node.argv
            if "--replicaof" in argv:
                argv = argv[: argv.index("--replicaof")]
            node.argv = [*argv, "--replicaof", "127.0.0.1", str(self.master_port())]
            self.group.start(name)
        if wait:
            self.wait_settled()

    def wait_settled(self) -> None:
        """Wait until a failover can happen again (what a fault test needs first)."""
        wait_until(self.settled, 20.0, "sentinel deployment back to master + replica")


def sentinel_deployment() -> SentinelDeployment:
    group = ProcessGroup("sentinel")
    master, replica, *sentinels = free_ports(5)
    group.add("redis-a", redis_server_argv(group, "redis-a", master), master)
    group.add(
        "redis-b",
        redis_server_argv(group, "redis-b", replica, "--replicaof", "127.0.0.1", str(master)),
        replica,
    )
    for i, port in enumerate(sentinels):
        name = f"sentinel-{i + 1}"
        config = group.path(name, "sentinel.conf")
        with open(config, "w") as handle:
            handle.write(
                f"port {port}\nbind 127.0.0.1\ndir {os.path.dirname(config)}\n"
                f"sentinel monitor mymaster 127.0.0.1 {master} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 3000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
        group.add(name, ["redis-server", config, "--sentinel"], port)
    deployment = SentinelDeployment(group, sentinels)
    try:
        for name in group.nodes:
            group.start(name, wait=False)
        for node in group.nodes.values():
            wait_until(lambda node=node: port_open(node.port), 10.0, f"sentinel node {node.name}")
        wait_until(deployment.settled, 20.0, "sentinels to discover each other")
    except BaseException:
        group.stop()
        raise
    return deployment


@dataclass
class RedisClusterDeployment:
    """3 primaries and 3 replicas, built with ADDSLOTSRANGE, MEET and REPLICATE."""

    group: ProcessGroup

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.group.nodes.values()]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _client(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, decode_responses=True)

    def primaries(self) -> dict[int, tuple[int, int]]:
        """Port of each live primary -> the slot range it serves, as a live node sees it."""
        for node in self.group.nodes.values():
            if not self.group.alive(node.name):
                continue
            client = self._client(node.port)
            try:
                slots = client.execute_command("CLUSTER", "SLOTS")
            except Exception:
                continue
            finally:
                client.close()
            return {int(entry[2][1]): (int(entry[0]), int(entry[1])) for entry in slots}
        raise RuntimeError("no cluster node answered")

    def node_at(self, port: int) -> str:
        return next(node.name for node in self.group.nodes.values() if node.port == port)

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every primary has a replica in sync."""
        try:
            for node in self.group.nodes.values():
                if not self.group.alive(node.name):
                    return False
                client = self._client(node.port)
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = client.info("replication")
                finally:
                    client.close()
                if info["role"] == "master":
                    slaves = int(info.get("connected_slaves", 0))
                    if slaves < 1 or info["slave0"].get("state") != "online":
                        return False
            return len(self.primaries()) == 3
        except Exception:
            return False

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a killed node again (it rejoins as a replica); ``wait`` for a healthy cluster."""
        if not self.group.alive(name):
            self.group.start(name)
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        """Wait until every primary has a replica in sync (what a fault test needs first)."""
        wait_until(self.healthy, 30.0, "Redis Cluster back to 3 primaries with replicas")


def redis_cluster() -> RedisClusterDeployment:
    group = ProcessGroup("redis-cluster")
    ports, bus_ports = (all_ports := free_ports(12))[:6], all_ports[6:]
    for i, (port, bus_port) in enumerate(zip(ports, bus_ports, strict=True)):
        name = f"node-{i + 1}"
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            # Not port + 10000, which may be taken, or past 65535.
            "--cluster-port", str(bus_port),
        ]  # fmt: skip
        group.add(name, redis_server_argv(group, name, port, *extra), port)
    deployment = RedisClusterDeployment(group)
    try:
        for name in group.nodes:
            group.start(name, wait=False)
        for node in group.nodes.values():
            wait_until(lambda node=node: port_open(node.port), 10.0, f"cluster node {node.name}")
        clients = [deployment._client(port) for port in ports]
        try:
            ids = [client.cluster("myid") for client in clients]
            ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
            for client, (first, last) in zip(clients[:3], ranges, strict=True):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0], bus_ports[0])

            def all_known() -> bool:
                return all(
                    len(c.execute_command("CLUSTER", "NODES").strip().splitlines()) == 6
                    for c in clients
                )

            wait_until(all_known, 10.0, "cluster nodes to meet")
            for replica, primary in zip(clients[3:], ids[:3], strict=True):
                replica.execute_command("CLUSTER", "REPLICATE", primary)
        finally:
            for client in clients:
                client.close()
        wait_until(deployment.healthy, 20.0, "Redis Cluster to be ok")
    except BaseException:
        group.stop()
        raise
    return deployment


# -- RabbitMQ --------------------------------------------------------------------------------


def rabbitmq_scripts() -> str | None:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts, or None.

    The Debian and RPM packages put them in ``/usr/lib/rabbitmq/bin``; the ones on the PATH
    (``/usr/sbin``) are wrappers that switch to the ``rabbitmq`` user when run as root, which
    would lose the environment (and the Erlang cookie) set here.
    """
    packaged = "/usr/lib/rabbitmq/bin"
    if os.path.isfile(os.path.join(packaged, "rabbitmq-server")):
        return packaged
    found = shutil.which("rabbitmq-server")
    return os.path.dirname(os.path.realpath(found)) if found else None


@dataclass
class RabbitMQCluster:
    """RabbitMQ nodes of a cluster of their own, started by this test run.

    Each node has its own name (``csync-rmq-<pid>-<letter>@localhost``), AMQP and distribution
    ports on loopback, configuration, data and log directories, and the cluster a private Erlang
    cookie (``HOME`` is the group's directory). They register with the machine's epmd (port
    4369, shared with any other node; started by the first node if it is not running, and left
    running, as ``rabbitmq-server`` does).
    """

    group: ProcessGroup
    scripts: str
    nodenames: dict[str, str]

    def url(self, *names: str, scheme: str = "amqp", query: str = "") -> str:
        """``scheme://guest:guest@h1:p1,h2:p2/`` naming ``names`` (default: every node)."""
        nodes = [self.group.nodes[name] for name in names or self.group.nodes]
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        return f"{scheme}://guest:guest@{hosts}/{query}"

    def ctl(self, *args: str, node: str | None = None, timeout: float = 30.0) -> str:
        """``rabbitmqctl -n <node> args`` (a live node by default): its output, or an error."""
        if node is None:
            node = next(name for name in self.group.nodes if self.group.alive(name))
        result = subprocess.run(
            [os.path.join(self.scripts, "rabbitmqctl"), "-n", self.nodenames[node], *args],
            env=self.group.nodes[node].env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def running_nodes(self) -> set[str]:
        """The nodes (our names: a, b, c) a live node sees running in its cluster."""
        import json

        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        by_erlang_name = {erlang: name for name, erlang in self.nodenames.items()}
        return {by_erlang_name[n] for n in status.get("running_nodes", []) if n in by_erlang_name}

    def queue_leader(self, queue: str) -> str:
        """The node (a, b, c) that leads stream or quorum queue ``queue``."""
        out = self.ctl("list_queues", "name", "leader", "--quiet", "--no-table-headers")
        by_erlang_name = {erlang: name for name, erlang in self.nodenames.items()}
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue and leader.strip() in by_erlang_name:
                return by_erlang_name[leader.strip()]
        raise RuntimeError(f"no leader for queue {queue!r} in {out!r}")

    def healthy(self) -> bool:
        """Every node runs and takes AMQP connections (a restarted node opens its listener only
        once it has rejoined the cluster)."""
        return all(
            self.group.alive(name) and port_open(node.port)
            for name, node in self.group.nodes.items()
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_until(self._checked(self.healthy), timeout, "the RabbitMQ cluster back to 3 nodes")

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a killed node again (its data directory makes it rejoin the cluster)."""
        if not self.group.alive(name):
            self.group.start(name, wait=False)
        if wait:
            self.wait_healthy()

    def _checked(self, condition: Callable[[], bool]) -> Callable[[], bool]:
        """``condition``, raising with the node's log if a node started here has exited."""

        def check() -> bool:
            for name, node in self.group.nodes.items():
                if node.process is not None and node.process.poll() not in (None, -9):
                    raise RuntimeError(
                        f"RabbitMQ node {name} exited ({node.process.returncode}):\n"
                        + self.group.log_tail(name)
                    )
            return condition()

        return check


def rabbitmq_cluster(size: int = 3) -> RabbitMQCluster:
    """``size`` RabbitMQ nodes joined into one cluster, the first one started first and the
    others joining it as they boot (classic-config peer discovery: no ``stop_app`` /
    ``join_cluster`` / ``start_app`` round, which took twice as long here). No plugins; AMQP
    0-9-1 on loopback only; ``guest``/``guest`` (allowed from loopback)."""
    import secrets
    import string

    scripts = rabbitmq_scripts()
    if scripts is None:
        raise RuntimeError("rabbitmq-server is not installed")
    group = ProcessGroup("rabbitmq")
    cookie = group.path(".erlang.cookie")
    with open(cookie, "w") as handle:
        handle.write("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
    os.chmod(cookie, 0o600)
    ports = free_ports(2 * size)
    names = [chr(ord("a") + i) for i in range(size)]
    nodenames = {name: f"csync-rmq-{os.getpid()}-{name}@localhost" for name in names}
    for i, name in enumerate(names):
        port, dist_port = ports[i], ports[size + i]
        config = group.path(name, "rabbitmq.conf")
        with open(config, "w") as handle:
            handle.write(f"listeners.tcp.1 = 127.0.0.1:{port}\n")
            if i:
                handle.write(
                    "cluster_formation.peer_discovery_backend = classic_config\n"
                    f"cluster_formation.classic_config.nodes.1 = {nodenames[names[0]]}\n"
                )
        for filename, text in [
            ("enabled_plugins", "[].\n"),  # no management plugin, no stream protocol plugin
            ("advanced.config", "[].\n"),  # not the machine's /etc/rabbitmq/advanced.config
            ("rabbitmq-env.conf", ""),  # not the machine's /etc/rabbitmq/rabbitmq-env.conf
        ]:
            with open(group.path(name, filename), "w") as handle:
                handle.write(text)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": group.root,  # its .erlang.cookie: the cluster's own
            "RABBITMQ_NODENAME": nodenames[name],
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": config,
            "RABBITMQ_ADVANCED_CONFIG_FILE": group.path(name, "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": group.path(name, "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": group.path(name, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.dirname(group.path(name, "data", "x")),
            "RABBITMQ_LOG_BASE": os.path.dirname(group.path(name, "log", "x")),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # The script then execs erl (the PID started is the node's, so a kill is a crash)
            # instead of waiting on it in the background; -noinput as it would pass.
            "RABBITMQ_ALLOW_INPUT": "true",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        }
        group.add(name, [os.path.join(scripts, "rabbitmq-server")], port).env = env
    cluster = RabbitMQCluster(group, scripts, nodenames)
    try:
        group.start(names[0], wait=False)
        first = group.nodes[names[0]]
        wait_until(cluster._checked(lambda: port_open(first.port)), 60.0, "RabbitMQ node a")
        for name in names[1:]:
            group.start(name, wait=False)
        cluster.wait_healthy()
        running = cluster.running_nodes()
        if running != set(names):
            raise RuntimeError(f"the RabbitMQ nodes did not form one cluster: {running}")
    except BaseException:
        group.stop()
        raise
    return cluster
