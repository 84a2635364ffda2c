"""A real single-node Apache Kafka broker (KRaft mode) fetched from Maven Central.

`ensure_running()` is idempotent: if `KAFKA_BOOTSTRAP_SERVERS` already answers, nothing is
started (an existing cluster, or our broker from an earlier `make up`); otherwise, for a
local address, it fetches the jars (once, into `.cache/kafka/libs`), writes the config,
formats storage (once, under `var/kafka/`) and starts the broker in the background.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path

from infra import services
from tasks.kafka import BrokerUnavailableError, wait_for_broker, wait_for_group_coordinator
from tasks.settings import Settings, get_settings

NAME = "kafka"
MARKER = "kafka.Kafka"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
LIBS = services.ROOT / ".cache" / "kafka" / "libs"
KAFKA_DIR = services.VAR / "kafka"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka_bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host.strip("[]"), int(port)


def _require(tool: str, install_hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise services.ServiceError(f"`{tool}` is not installed; {install_hint}")
    return path


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


def _write_config(host: str, port: int) -> Path:
    data = KAFKA_DIR / "data"
    config = KAFKA_DIR / "server.properties"
    KAFKA_DIR.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{port + 1}",
                f"advertised.listeners=PLAINTEXT://{host}:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"controller.quorum.bootstrap.servers={host}:{port + 1}",
                f"log.dirs={data}",
                "num.partitions=3",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=10",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                # Compacted topics (alerts, changelogs) compact soon on a dev box.
                "log.cleaner.backoff.ms=1000",
                "",
            ]
        )
    )
    (KAFKA_DIR / "log4j2.properties").write_text(
        "\n".join(
            [
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
        )
    )
    return config


def _java_argv(java: str, main: str, *args: str) -> list[str]:
    return [
        java, "-Xmx512m", "-Xms256m", "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
        "-cp", f"{LIBS}/*", main, *args,
    ]  # fmt: skip


def _format_storage(java: str, config: Path) -> None:
    if (KAFKA_DIR / "data" / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    done = subprocess.run(
        _java_argv(java, "kafka.tools.StorageTool", "format", "--standalone",
                   "--cluster-id", cluster_id, "--config", str(config)),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise services.ServiceError(f"formatting Kafka storage failed:\n{done.stderr[-2000:]}")


def is_answering(settings: Settings | None = None) -> bool:
    s = settings or get_settings()
    if not services.port_open(*_address(s)):
        return False
    try:
        wait_for_broker(s)
    except BrokerUnavailableError:
        return False
    return True


def ensure_running(settings: Settings | None = None, timeout_s: float = 90.0) -> bool:
    """Make sure a broker answers; returns True if this call started it."""
    s = settings or get_settings()
    if is_answering(s):
        return False
    host, port = _address(s)
    if host not in LOCAL_HOSTS:
        raise services.ServiceError(
            f"Kafka at {s.kafka_bootstrap_servers} does not answer, and it is not a local "
            "address, so nothing was started. Check KAFKA_BOOTSTRAP_SERVERS."
        )
    pid = services.running_pid(NAME)
    if pid is None:
        java = _require("java", "install a JDK 17+ (Debian: `apt-get install openjdk-17-jdk`).")
        fetch()
        config = _write_config(host, port)
        _format_storage(java, config)
        pid = services.start(NAME, _java_argv(java, "kafka.Kafka", str(config)), MARKER)
    answering = services.wait_for(
        lambda: not services.alive(pid) or is_answering(s), timeout_s, interval_s=0.5
    )
    if not answering or not services.alive(pid):
        raise services.ServiceError(
            f"Kafka did not come up at {s.kafka_bootstrap_servers} within {timeout_s:g}s; "
            f"last lines of {services.log_path(NAME)}:\n{services.log_tail(NAME)}"
        )
    wait_for_group_coordinator(s)
    return True


def stop() -> bool:
    """Stop the broker this project started (an external cluster is never touched)."""
    return services.stop(NAME, timeout_s=30)
