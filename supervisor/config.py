"""Runtime configuration of the supervisor: one frozen dataclass, filled from flags and env.

Flags win over environment variables, which win over the defaults below. Nothing else in
the supervisor reads `os.environ` for its own settings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:6420"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_file(path: Path) -> dict[str, object]:
    """Read a TOML settings file; its keys are `Config` field names (plus `listen`)."""
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    known = {f.name for f in fields(Config)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key == "listen":
            values["host"], values["port"] = parse_listen(str(value))
        elif key in ("state_dir", "runtime_dir", "preview_secret_file"):
            values[key] = Path(str(value))
        elif key == "network" and isinstance(value, dict):
            for rule_kind, rules in value.items():
                if rule_kind not in ("allow", "deny") or not isinstance(rules, list):
                    raise ValueError(f"{path}: [network] takes allow = [...] and deny = [...], "
                                     f"got {rule_kind!r}")
                values[f"network_{rule_kind}"] = tuple(str(r) for r in rules)
        elif key in ("tokens", "allowed_hosts", "allowed_origins") and isinstance(value, list):
            values[key] = tuple(value)
        elif key in known:
            values[key] = value
        else:
            raise ValueError(f"{path}: unknown setting {key!r}")
    return values


RUNTIME_DIR_PREFIX = "actorvisor-"
RUNTIME_OWNER_FILE = "owner.pid"


def make_private_runtime_dir() -> Path:
    # A private dir under /tmp keeps the ipc path short (AF_UNIX paths are limited to
    # 107 bytes) whatever the state dir is. Its creator removes it at stop; the pid in it
    # lets a later supervisor remove it when its creator was killed instead.
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_DIR_PREFIX))
    (path / RUNTIME_OWNER_FILE).write_text(str(os.getpid()))
    return path


def remove_stale_runtime_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the private runtime dirs of supervisors that died without removing theirs
    (`kill -9`), and say which. A dir whose owner lives, or that names no owner (yet, or
    not ours), is left alone."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{RUNTIME_DIR_PREFIX}*"):
        try:
            owner = int((path / RUNTIME_OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 6420
    state_dir: Path = Path(".actorvisor")
    runtime_dir: Path | None = None
    boot_delay: float = 0.0
    # Workers and their supervision.
    spawner: str = "zygote"            # or "subprocess"
    heartbeat_interval: float = 1.0    # libzmq pings each worker connection this often; the tick
    hang_timeout: float = 10.0         # no pong for this long: the connection drops (docs/delivery.md)
    hello_timeout: float = 30.0        # a started worker must say hello within this
    sleep_after: float = 300.0         # idle actors (no connection, no action) sleep
    stop_timeout: float = 10.0         # graceful drain budget on SIGTERM
    restart_intensity: int = 5         # more than this many crashes ...
    restart_period: float = 60.0       # ... within this many seconds marks an actor failed
    worker_memory_mb: int = 0          # RLIMIT_AS per worker (0: no limit)
    worker_open_files: int = 0         # RLIMIT_NOFILE per worker (0: inherit)
    # Bounds that protect the supervisor from any one client or actor.
    max_message_size: int = 1 << 20
    max_pending_actions: int = 1024
    action_timeout: float = 600.0
    conn_queue_bytes: int = 8 << 20
    ring_size: int = 4096
    # Delivery guarantee: implicit cursor for connections that bring none.
    implicit_cursor_grace: float = 1.0
    implicit_cursor_window: float = 10.0
    log_level: str = "info"
    # Every VM's bounds (vmworker.vm.VmSettings): the whole VM, not per process.
    vm_memory_mb: int = 2048
    vm_pids: int = 1024
    vm_cpus: float = 1.0
    vm_disk_mb: int = 4096
    vm_shm_mb: int = 64
    vm_uid_base: int = 0x70000000
    unsafe_no_limits: bool = False     # run VMs even where these bounds cannot be applied
    vm_max_processes: int = 64         # running processes started with `spawn`, per VM
    vm_max_shells: int = 16            # open shells (`openShell`), per VM
    vm_output_log_mb: int = 8          # output each process or shell keeps in the log
    # Every VM's default egress policy (`[network]` allow/deny; docs/network.md).
    network_allow: tuple[str, ...] = ()
    network_deny: tuple[str, ...] = ()
    # Signs preview URLs (docs/network.md); outside the state dir. None: the credentials
    # dir systemd gives, else /etc/actorvisor/preview-secret (supervisor.preview).
    preview_secret_file: Path | None = None
    # The perimeter (supervisor.perimeter, supervisor.auth; docs/security.md).
    auth_token: str = ""               # one admin token (ACTORVISOR_AUTH_TOKEN)
    tokens: tuple[dict[str, object], ...] = ()  # [[tokens]] hash|token, role, prefixes
    auth_hook: str = ""                # "module:function" checking (grant, params)
    allowed_hosts: tuple[str, ...] = ()      # Host names besides the listen address
    allowed_origins: tuple[str, ...] = ()    # browser Origins allowed to drive actors
    metrics_public: bool = False       # /metrics without a token when auth is on
    insecure_no_auth: bool = False     # allow a non-loopback listen without any token
    max_running_actors: int = 300      # running workers at once; more: actor.overloaded
    max_creations_per_minute: int = 60  # new actor keys per client address; more: actor.overloaded
    max_connections: int = 5000        # open TCP connections; more: 503 and close
    max_connections_per_address: int = 1000
    header_timeout: float = 10.0       # a request head must arrive within this
    idle_timeout: float = 30.0         # keep-alive HTTP connections idle longer are closed
    # agentOS parity (docs/agentos-parity.md): sessions that set no permissionPolicy ask
    # before each tool call (fail closed) unless this says "allow_all".
    permission_policy: str = "ask"
    # Cron (supervisor/cron.py): a schedule that may fire more often than this is refused.
    cron_min_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.permission_policy not in ("ask", "allow_all"):
            raise ValueError(f"permission_policy must be 'ask' or 'allow_all', "
                             f"got {self.permission_policy!r}")
        if not self.cron_min_interval >= 0:
            raise ValueError(f"cron_min_interval must be a number of seconds >= 0, "
                             f"got {self.cron_min_interval!r}")

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, config_file: Path | None = None, **overrides: object) -> Config:
        """Defaults < config file < environment < explicit overrides (the CLI's flags)."""
        values: dict[str, object] = {}
        if config_file is not None:
            values.update(load_file(config_file))
        if listen := os.environ.get("ACTORVISOR_LISTEN"):
            values["host"], values["port"] = parse_listen(listen)
        if state := os.environ.get("ACTORVISOR_STATE_DIR"):
            values["state_dir"] = Path(state)
        if delay := os.environ.get("ACTORVISOR_BOOT_DELAY"):
            values["boot_delay"] = float(delay)
        if level := os.environ.get("ACTORVISOR_LOG_LEVEL"):
            values["log_level"] = level
        if token := os.environ.get("ACTORVISOR_AUTH_TOKEN"):
            values["auth_token"] = token
        if runtime := os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
            values["runtime_dir"] = Path(runtime.split(":")[0])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

