"""`python -m stream_workers all`: every stream worker as a child process, restarted when it
crashes.

Runs `price-alerts`, `transaction-alerts` and `jobs --processor <p>` for each known processor
(`tasks.jobs.PROCESSORS`), each `--instances` times (default once). Each child gets a stable
`--instance` (0, 1, ...): static group membership and a fixed transactional id, so a restarted
child takes its predecessor's partitions back at once.

- A child that crashes (a non-zero exit, or killed by a signal) is restarted after a backoff:
  1 s, doubling up to 60 s, back to 1 s once it had run for 60 s. A child that exits 2 (bad
  settings or usage: restarting cannot help) stops everything: the supervisor stops the others
  and exits 2.
- SIGTERM / SIGINT / SIGHUP: SIGTERM to every child (each finishes its batch, commits and
  exits 0), a wait of up to `--stop-timeout` seconds, then SIGKILL for those left; exit 0 when
  every child exited 0, else 1. A second such signal kills them all at once.
- Each child runs in its own process group, so a terminal's Ctrl-C reaches the supervisor only
  (which forwards one SIGTERM). On Linux the kernel SIGKILLs each child when the supervisor
  dies without stopping them (killed by SIGKILL itself: PR_SET_PDEATHSIG), so none outlives
  it; what they had not committed is aborted when the next worker of the same `--instance`
  starts. The jobs daemon's REALTIME lane stops by itself once its parent is gone.
- `--metrics-port P` (default STREAM_METRICS_PORT): the children get `--metrics-port` P, P+1,
  ... in the order they are listed by `--help`; unset, no child gets the option.
- Children get STREAM_STATUS_DIR (default `var/stream-status` under the current directory), the
  status files `make status` lists.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tasks.jobs import PROCESSORS
from tasks.settings import Settings, get_settings

log = logging.getLogger("stream_workers.all")

# The workers, in the order of the children (and of their metrics ports).
WORKERS = ("price-alerts", "transaction-alerts", "jobs")
DEFAULT_STATUS_DIR = Path("var/stream-status")
BAD_SETTINGS = 2  # a child's (and the supervisor's) exit status for bad settings or usage
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# --- what runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    """One child: `python -m stream_workers <worker> <args> --instance <instance> ...`."""

    worker: str
    instance: str
    name: str  # e.g. "price-alerts/0", "jobs-payments/0": what logs call it
    args: tuple[str, ...] = ()  # before --instance, e.g. ("--processor", "payments")
    metrics_port: int | None = None
    extra: tuple[str, ...] = ()  # the operator's --worker-args for this worker

    def argv(self, python: str = sys.executable) -> list[str]:
        argv = [python, "-m", "stream_workers", self.worker, *self.args,
                "--instance", self.instance]  # fmt: skip
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        return argv + list(self.extra)

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def parse_instances(text: str) -> dict[str, int]:
    """`price-alerts=2,jobs=0` -> instances per worker (1 for each worker not named)."""
    counts = dict.fromkeys(WORKERS, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        worker, sep, count = item.partition("=")
        worker = worker.strip()
        if worker not in counts:
            raise ValueError(f"{worker!r} is not a worker (workers: {', '.join(WORKERS)})")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"{item!r}: want <worker>=<instances>, instances 0 or more")
        counts[worker] = int(count)
    return counts


def parse_worker_args(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """`['transaction-alerts=--batch-size 5000']` -> extra options per worker."""
    extra: dict[str, tuple[str, ...]] = {}
    for item in items:
        worker, sep, options = item.partition("=")
        if not sep or worker.strip() not in WORKERS:
            raise ValueError(
                f"{item!r}: want <worker>=<options>, worker one of {', '.join(WORKERS)}"
            )
        extra[worker.strip()] = extra.get(worker.strip(), ()) + tuple(shlex.split(options))
    return extra


def plan(
    instances: Mapping[str, int],
    processors: Sequence[str] = tuple(PROCESSORS),
    metrics_port: int | None = None,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> list[ChildSpec]:
    """Every child, in a fixed order: price-alerts instances, transaction-alerts instances,
    then for each processor (sorted) its jobs instances; metrics ports consecutive from
    `metrics_port` in that order."""
    extra = extra or {}
    wanted: list[tuple[str, str, tuple[str, ...]]] = []  # (worker, name prefix, args)
    for worker in WORKERS:
        if worker == "jobs":
            wanted += [(worker, f"jobs-{p}", ("--processor", p)) for p in sorted(processors)]
        else:
            wanted.append((worker, worker, ()))
    children: list[ChildSpec] = []
    for worker, prefix, args in wanted:
        for i in range(instances.get(worker, 1)):
            port = None if metrics_port is None else metrics_port + len(children)
            children.append(ChildSpec(worker, str(i), f"{prefix}/{i}", args, port,
                                      tuple(extra.get(worker, ()))))  # fmt: skip
    return children


def port_free(port: int) -> bool:
    """Whether a server could listen on `port` now (on every interface, as an exporter does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the exporters' servers do: a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def check_ports(
    children: Sequence[ChildSpec], is_free: Callable[[int], bool] = port_free
) -> str | None:
    """None when every child's metrics port is valid and free, else one line naming the port."""
    ported = [c for c in children if c.metrics_port is not None]
    if not ported:
        return None
    first, last = ported[0].metrics_port, ported[-1].metrics_port
    assert first is not None and last is not None
    if last > 65535:
        past = next(c for c in ported if c.metrics_port and c.metrics_port > 65535)
        return (f"--metrics-port {first}: {len(ported)} workers need ports {first}-{last}; "
                f"port {past.metrics_port} ({past.name}) is past 65535")  # fmt: skip
    for child in ported:
        assert child.metrics_port is not None
        if not is_free(child.metrics_port):
            return (f"--metrics-port {first}: port {child.metrics_port} ({child.name}) is "
                    "already in use")  # fmt: skip
    return None


def status_dir(settings: Settings) -> Path:
    """Where the children write their status files (absolute)."""
    return (settings.stream_status_dir or DEFAULT_STATUS_DIR).absolute()


# --- the restart policy --------------------------------------------------------------------


@dataclass
class Backoff:
    """The wait before restarting a child: `initial_s` doubling up to `max_s` with every crash
    in a row; a child that ran `stable_s` or longer before it crashed starts over."""

    initial_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 60.0
    crashes: int = 0  # in a row

    def after_crash(self, ran_for_s: float) -> float:
        if ran_for_s >= self.stable_s:
            self.crashes = 0
        delay = min(self.max_s, self.initial_s * 2**self.crashes)
        self.crashes += 1
        return delay


def describe_exit(returncode: int) -> str:
    """`exited 1`, `killed by SIGKILL` (Popen's negative return codes)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited {returncode}"


# --- the supervisor ------------------------------------------------------------------------


class Process(Protocol):
    """What the supervisor needs of a child process (a subprocess.Popen)."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...


@dataclass
class Child:
    spec: ChildSpec
    backoff: Backoff
    process: Process | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a crashed child is due to start again
    killed: bool = False  # SIGKILLed by the supervisor while stopping
    returncode: int | None = None  # its last exit


@dataclass
class Supervisor:
    """Starts the children, restarts the ones that crash, stops them all on request.

    Driven by `step()` (the main loop calls it every `tick_s`); `launch` starts one child,
    `clock` is monotonic seconds: both are replaced by fakes in the unit tests.
    """

    specs: Sequence[ChildSpec]
    launch: Callable[[ChildSpec], Process]
    clock: Callable[[], float] = time.monotonic
    stop_timeout_s: float = 30.0
    backoff: Callable[[], Backoff] = Backoff
    children: list[Child] = field(init=False)
    stopping: str | None = field(default=None, init=False)  # why, once stopping
    exit_code: int = field(default=0, init=False)
    _stop_deadline: float | None = field(default=None, init=False)
    _kill_now: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.children = [Child(spec, self.backoff()) for spec in self.specs]

    # --- requests (from signal handlers: they only set flags) ---------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """A first SIGTERM / SIGINT: stop every child cleanly; a second: kill them at once."""
        if self.stopping is None:
            self.stopping = f"received {signal.Signals(signum).name}"
        elif not self._kill_now:
            self._kill_now = True
            self.exit_code = 128 + signum

    # --- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        for child in self.children:
            self._start(child)

    def step(self) -> bool:
        """Reap exits, restart what is due, carry stopping on; False once all is stopped."""
        now = self.clock()
        for child in self.children:
            if child.process is not None:
                returncode = child.process.poll()
                if returncode is not None:
                    self._exited(child, returncode, now)
        if self.stopping is not None:
            return self._stop_step(now)
        for child in self.children:
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                self._start(child)
        return True

    def run(self, tick_s: float = 0.1) -> int:
        """Start the children and supervise until stopped; returns the exit status."""
        self.start()
        while self.step():
            time.sleep(tick_s)
        return self.exit_code

    # --- internals ----------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        try:
            child.process = self.launch(child.spec)
        except OSError as error:  # e.g. out of processes: like a crash, retried later
            delay = child.backoff.after_crash(0.0)
            child.restart_at = child.started_at + delay
            log.error("%s: could not start (%s); retrying in %gs", child.spec.name, error, delay)
            return
        log.info("started %s (pid %d): %s", child.spec.name, child.process.pid,
                 shlex.join(["python", *child.spec.argv()[1:]]))  # fmt: skip

    def _exited(self, child: Child, returncode: int, now: float) -> None:
        assert child.process is not None
        pid, ran_for = child.process.pid, now - child.started_at
        child.process, child.returncode = None, returncode
        spec = child.spec
        what = (f"{spec.name} (worker {spec.worker}, instance {spec.instance}, pid {pid}) "
                f"{describe_exit(returncode)} after {ran_for:.1f}s")  # fmt: skip
        if self.stopping is not None:
            if child.killed:
                log.error("%s: killed", what)
            elif returncode == 0:
                log.info("%s: stopped", what)
            else:
                log.error("%s while stopping", what)
            return
        if returncode == BAD_SETTINGS:
            log.error("%s: bad settings or usage (its error is above); restarting cannot "
                      "help: stopping every worker", what)  # fmt: skip
            self.stopping = f"{spec.name} exited {BAD_SETTINGS}: bad settings or usage"
            self.exit_code = BAD_SETTINGS
            return
        delay = child.backoff.after_crash(ran_for)
        child.restart_at = now + delay
        if returncode == 0:  # stopped from outside (a SIGTERM of its own): it should run
            log.warning("%s on its own; restarting in %gs", what, delay)
        else:
            log.error("crashed: %s; restarting in %gs", what, delay)

    def _stop_step(self, now: float) -> bool:
        running = [c for c in self.children if c.process is not None]
        if self._stop_deadline is None:  # the first step since stopping was asked for
            log.info("stopping %d worker(s): %s", len(running), self.stopping)
            self._stop_deadline = now + self.stop_timeout_s
            for child in running:
                self._signal(child, signal.SIGTERM)
        if running and (self._kill_now or now >= self._stop_deadline):
            why = (
                "a second signal" if self._kill_now else f"not stopped in {self.stop_timeout_s:g}s"
            )
            for child in running:
                if not child.killed:
                    assert child.process is not None
                    log.error("%s (pid %d): SIGKILL to it and its children (%s)",
                              child.spec.name, child.process.pid, why)  # fmt: skip
                    child.killed = True
                    self._signal(child, signal.SIGKILL, group=True)
        if running:
            return True
        if self.exit_code == 0 and any(c.returncode not in (None, 0) for c in self.children):
            self.exit_code = 1
        if self.exit_code == 0:
            log.info("every worker stopped cleanly")
        else:
            log.error("stopped (%s); exit status %d", self.stopping, self.exit_code)
        return False

    def _signal(self, child: Child, signum: int, group: bool = False) -> None:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            if group:  # the child's own children too (the jobs daemon's REALTIME lane)
                os.killpg(child.process.pid, signum)
            else:
                child.process.send_signal(signum)


# --- processes -----------------------------------------------------------------------------


def _die_with_supervisor() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when the supervisor dies (None
    elsewhere). The supervisor has no threads, so running Python between fork and exec is
    safe here.

    SIGKILL rather than SIGTERM: the parent-death signal can arrive more than once (seen
    here: once per thread of the child), and a worker takes a second SIGTERM as "exit at
    once" anyway. Exactly-once does not depend on a clean stop: the next start of the same
    `--instance` fences the dead one's transactions."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    supervisor = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != supervisor:  # it died before the request took effect
            os._exit(1)

    return preexec


def launcher(env: Mapping[str, str]) -> Callable[[ChildSpec], Process]:
    """Start a child with `env`, its output on ours, in its own process group."""
    preexec = _die_with_supervisor()

    def launch(spec: ChildSpec) -> Process:
        return subprocess.Popen(
            spec.argv(), env=dict(env), stdin=subprocess.DEVNULL, process_group=0,
            preexec_fn=preexec,
        )  # fmt: skip

    return launch


# --- the command ---------------------------------------------------------------------------


def _instances_arg(text: str) -> dict[str, int]:
    try:
        return parse_instances(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser(settings: Settings) -> argparse.ArgumentParser:
    port = settings.stream_metrics_port or "unset"
    defaults = plan(dict.fromkeys(WORKERS, 1), metrics_port=settings.stream_metrics_port)
    runs = "\n".join(f"  {c.name:<22} {shlex.join(['python', *c.argv()[1:]])}" for c in defaults)
    parser = argparse.ArgumentParser(
        prog="python -m stream_workers all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every stream worker as a child process: restart a child that crashes\n"
        "(backoff 1 s doubling to 60 s), stop all when one exits 2 (bad settings or usage),\n"
        "stop all cleanly on SIGTERM / SIGINT / SIGHUP (a second one kills at once).",
        epilog=f"""workers it runs, in this order (the order of the metrics ports):
{runs}

settings (environment variables or .env):
  STREAM_METRICS_PORT   default of --metrics-port (now: {port})
  STREAM_STATUS_DIR     passed to the children, where each writes its status file
                        (now: {status_dir(settings)})
  PREFECT_API_URL       passed to the children (their Prefect events)
  every other setting   read by the children themselves (e.g. PRICE_ALERTS_GROUP,
                        TRANSACTION_ALERTS_GROUP, JOBS_TOPIC_PREFIX)""",
    )
    parser.add_argument(
        "--instances", type=_instances_arg, default=dict.fromkeys(WORKERS, 1),
        metavar="WORKER=N,...",
        help="instances per worker, e.g. price-alerts=2,jobs=0 (default: 1 each; jobs: per "
        "processor); instance ids are 0..N-1",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-port", type=int, default=settings.stream_metrics_port, metavar="P",
        help="give the children --metrics-port P, P+1, ... (default: STREAM_METRICS_PORT, "
        f"now {port}; unset: no child gets the option)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-args", action="append", default=[], metavar="WORKER=OPTIONS",
        help="extra options for every child of one worker, e.g. "
        "'transaction-alerts=--batch-size 5000' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--stop-timeout", type=float, default=30.0, metavar="S",
        help="on SIGTERM, how long to wait for the children before SIGKILL (default: 30)",
    )  # fmt: skip
    return parser


def main(argv: list[str]) -> int:
    settings = get_settings()
    parser = _parser(settings)
    args = parser.parse_args(argv)
    try:
        extra = parse_worker_args(args.worker_args)
    except ValueError as error:
        parser.error(f"--worker-args: {error}")
    specs = plan(args.instances, metrics_port=args.metrics_port, extra=extra)
    if not specs:
        parser.error("--instances: no worker to run")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        print(f"python -m stream_workers all: --metrics-port {args.metrics_port}: not a port "
              "(1-65535)", file=sys.stderr)  # fmt: skip
        return BAD_SETTINGS
    problem = check_ports(specs)
    if problem is not None:
        print(f"python -m stream_workers all: {problem}", file=sys.stderr)
        return BAD_SETTINGS
    statuses = status_dir(settings)
    env = {**os.environ, "STREAM_STATUS_DIR": str(statuses)}
    supervisor = Supervisor(specs, launcher(env), stop_timeout_s=args.stop_timeout)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: supervisor.request_stop(signum))
    log.info("supervising %d worker(s) (pid %d); status files in %s", len(specs), os.getpid(),
             statuses)  # fmt: skip
    for spec in specs:
        if spec.metrics_url is not None:
            log.info("%s metrics %s", spec.name, spec.metrics_url)
    return supervisor.run()
