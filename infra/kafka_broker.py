"""A real single-node Apache Kafka broker (KRaft mode) fetched from Maven Central.

`ensure_running()` is idempotent: if `KAFKA_BOOTSTRAP_SERVERS` already answers, nothing is
started (an existing cluster, or our broker from an earlier `make up`); otherwise, for a
local address, it fetches the jars (once, into `.cache/kafka/libs`), writes the config,
formats storage (once, under `var/kafka/`) and starts the broker in the background.

`Broker(BrokerConfig(...), log_file)` starts another broker with its own directory, ports
and listeners (e.g. SASL or SSL ones), owned and stopped by its caller (the tests).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra import services
from tasks.kafka import (
    BrokerUnavailableError,
    KafkaConfigError,
    wait_for_broker,
    wait_for_group_coordinator,
)
from tasks.settings import Settings, get_settings

NAME = "kafka"
MARKER = "kafka.Kafka"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
LIBS = services.ROOT / ".cache" / "kafka" / "libs"
KAFKA_DIR = services.VAR / "kafka"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Listener:
    """A client listener: its name, port and security protocol (default: the name)."""

    name: str
    port: int
    protocol: str | None = None

    @property
    def security_protocol(self) -> str:
        return self.protocol or self.name


@dataclass(frozen=True)
class BrokerConfig:
    """Where a broker keeps its files and how it listens.

    The first listener is also the inter-broker one; the controller listener is always
    PLAINTEXT on `host:controller_port`. `properties` are added to `server.properties`
    as they are (SASL JAAS configs, SSL key and trust stores, ...).
    """

    directory: Path
    listeners: tuple[Listener, ...]
    controller_port: int
    host: str = "127.0.0.1"
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config_file(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.directory / "log4j2.properties"

    def server_properties(self) -> dict[str, str]:
        host = self.host
        names = [listener.name for listener in self.listeners]
        if "CONTROLLER" in names or len(set(names)) != len(names):
            raise ValueError(f"listener names must be unique and not CONTROLLER: {names}")
        protocols = [f"{lst.name}:{lst.security_protocol}" for lst in self.listeners]
        endpoints = [f"{lst.name}://{host}:{lst.port}" for lst in self.listeners]
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": ",".join([*endpoints, f"CONTROLLER://{host}:{self.controller_port}"]),
            "advertised.listeners": ",".join(endpoints),
            "inter.broker.listener.name": names[0],
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": ",".join([*protocols, "CONTROLLER:PLAINTEXT"]),
            "controller.quorum.bootstrap.servers": f"{host}:{self.controller_port}",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Compacted topics (alerts, changelogs) compact soon on a dev box.
            "log.cleaner.backoff.ms": "1000",
            **self.properties,
        }


def default_config(settings: Settings | None = None) -> BrokerConfig:
    """The `make up` broker: PLAINTEXT on KAFKA_BOOTSTRAP_SERVERS' first address, the
    controller on the next port, files under `var/kafka/`."""
    host, port = _address(settings or get_settings())
    return BrokerConfig(KAFKA_DIR, (Listener("PLAINTEXT", port),), port + 1, host)


def _address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka_bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host.strip("[]"), int(port)


def _require(tool: str, install_hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise services.ServiceError(f"`{tool}` is not installed; {install_hint}")
    return path


def _java() -> str:
    return _require("java", "install a JDK 17+ (Debian: `apt-get install openjdk-17-jdk`).")


def fetch() -> Path:
    """Download the broker jars once with Maven (a no-op when they are cached)."""
    if any(LIBS.glob("kafka_2.13-*.jar")):
        return LIBS
    mvn = _require("mvn", "install Maven 3.6+ (Debian: `apt-get install maven`) to fetch Kafka.")
    LIBS.mkdir(parents=True, exist_ok=True)
    services.LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(services.log_path("kafka-fetch"), "ab") as log:
        done = subprocess.run(
            [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={LIBS}", "-DincludeScope=runtime"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    if done.returncode != 0 or not any(LIBS.glob("kafka_2.13-*.jar")):
        raise services.ServiceError(
            f"fetching Kafka with Maven failed; see {services.log_path('kafka-fetch')}:\n"
            + services.log_tail("kafka-fetch")
        )
    return LIBS


_LOG4J = [
    "appender.out.type=Console",
    "appender.out.name=out",
    "appender.out.layout.type=PatternLayout",
    "appender.out.layout.pattern=[%d] %p %m (%c)%n",
    "rootLogger.level=INFO",
    "rootLogger.appenderRef.out.ref=out",
    "logger.kafka.name=kafka",
    "logger.kafka.level=WARN",
    "logger.state.name=state.change.logger",
    "logger.state.level=WARN",
    "",
]


def _write_config(config: BrokerConfig) -> Path:
    config.directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{key}={value}" for key, value in config.server_properties().items()]
    config.config_file.write_text("\n".join([*lines, ""]))
    config.log4j_file.write_text("\n".join(_LOG4J))
    return config.config_file


def _java_argv(java: str, main: str, *args: str, directory: Path = KAFKA_DIR) -> list[str]:
    return [
        java, "-Xmx512m", "-Xms256m", "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={directory / 'log4j2.properties'}",
        "-cp", f"{LIBS}/*", main, *args,
    ]  # fmt: skip


def _format_storage(java: str, config: BrokerConfig) -> None:
    if (config.data_dir / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    done = subprocess.run(
        _java_argv(java, "kafka.tools.StorageTool", "format", "--standalone",
                   # `=`: an id may start with "-" (urlsafe base64), which argparse would
                   # read as an option.
                   f"--cluster-id={cluster_id}", "--config", str(config.config_file),
                   directory=config.directory),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise services.ServiceError(f"formatting Kafka storage failed:\n{done.stderr[-2000:]}")


def _prepare(config: BrokerConfig) -> list[str]:
    """Fetch, write the config, format storage once: the broker's command line."""
    java = _java()
    fetch()
    _write_config(config)
    _format_storage(java, config)
    return _java_argv(java, "kafka.Kafka", str(config.config_file), directory=config.directory)


def is_answering(settings: Settings | None = None) -> bool:
    """True once the cluster answers a metadata request with these settings. Settings the
    cluster refuses (credentials, mechanism, CA file) raise KafkaConfigError: waiting
    cannot fix them."""
    s = settings or get_settings()
    if not services.port_open(*_address(s)):
        return False
    try:
        wait_for_broker(s)
    except KafkaConfigError:
        raise
    except BrokerUnavailableError:
        return False
    return True


def _wait_until_answering(
    settings: Settings,
    alive: Callable[[], bool],
    timeout_s: float,
    log_file: Path,
    tail: Callable[[], str],
) -> None:
    answering = services.wait_for(
        lambda: not alive() or is_answering(settings), timeout_s, interval_s=0.5
    )
    if not answering or not alive():
        raise services.ServiceError(
            f"Kafka did not come up at {settings.kafka_bootstrap_servers} within "
            f"{timeout_s:g}s; last lines of {log_file}:\n{tail()}"
        )
    wait_for_group_coordinator(settings)


def ensure_running(settings: Settings | None = None, timeout_s: float = 90.0) -> bool:
    """Make sure a broker answers; returns True if this call started it."""
    s = settings or get_settings()
    if is_answering(s):
        return False
    host, _ = _address(s)
    if host not in LOCAL_HOSTS:
        raise services.ServiceError(
            f"Kafka at {s.kafka_bootstrap_servers} does not answer, and it is not a local "
            "address, so nothing was started. Check KAFKA_BOOTSTRAP_SERVERS."
        )
    pid = services.running_pid(NAME)
    if pid is None:
        pid = services.start(NAME, _prepare(default_config(s)), MARKER)
    _wait_until_answering(
        s,
        lambda: services.alive(pid),
        timeout_s,
        services.log_path(NAME),
        lambda: services.log_tail(NAME),
    )
    return True


def stop() -> bool:
    """Stop the broker this project started (an external cluster is never touched)."""
    return services.stop(NAME, timeout_s=30)


class Broker:
    """A broker of the caller's own (no pid file, so `make down` leaves it alone): started
    in its own session with its output in `log_file`; `stop()` (or leaving the `with`
    block) ends it.

    `start(settings)` returns once a client with `settings` (bootstrap address and
    security of one of its listeners) gets metadata and consumer groups work.
    """

    def __init__(self, config: BrokerConfig, log_file: Path) -> None:
        self.config = config
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def start(self, settings: Settings, timeout_s: float = 90.0) -> Broker:
        if self.process is not None:
            raise RuntimeError("this broker was already started")
        argv = _prepare(self.config)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=dict(os.environ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_until_answering(settings, self.alive, timeout_s, self.log_file, self.log_tail)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the broker's process group, SIGKILL after `timeout_s`."""
        if self.process is not None:
            services.stop_group(self.process, timeout_s)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
