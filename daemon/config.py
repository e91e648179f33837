"""The one TOML configuration file (SPEC.md "Configuration").

Every section is a frozen dataclass; the loader walks the dataclass fields, so a key that is not a
field is an error naming the key (exit 2), and each value is checked against the field's type
(both in llmtap.config_validation, with the checks beyond types).
"""

from __future__ import annotations

import dataclasses
import ntpath
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmtap import hostpatterns
from llmtap.config_validation import build, parse_listen, validate
from llmtap.errors import UsageError
from llmtap.rules.strings import DEFAULT_PROTECTED_FIELDS

CONFIG_ENV = "LLMTAP_CONFIG"


@dataclass(frozen=True)
class SystemPaths:
    """Where llmtap keeps things on this kind of system unless the config says otherwise."""

    config_file: Path
    state_dir: Path
    records_dir: Path
    run_dir: Path
    public_dir: Path  # the CA certificate for every user (no key)
    log_file: Path  # the service's output where there is no journal


def system_paths(platform: str | None = None, environ: Mapping[str, str] | None = None
                 ) -> SystemPaths:
    """The defaults: FHS paths on Linux and macOS, %ProgramData%\\llmtap on Windows (where the
    config, state, records and status live side by side, as Windows services keep them)."""
    if (platform or sys.platform) == "win32":
        env = os.environ if environ is None else environ
        base = ntpath.join(env.get("ProgramData") or r"C:\ProgramData", "llmtap")
        return SystemPaths(*(Path(ntpath.join(base, name)) for name in (
            "config.toml", "state", "records", "run", "public", "llmtap.log")))
    # macOS has no /run (and its system volume is read-only): the run files go in /var/run.
    run = "/var/run/llmtap" if (platform or sys.platform) == "darwin" else "/run/llmtap"
    return SystemPaths(Path("/etc/llmtap/config.toml"), Path("/var/lib/llmtap"),
                       Path("/var/lib/llmtap/records"), Path(run), Path("/etc/llmtap"),
                       Path("/var/log/llmtap.log"))


DEFAULTS = system_paths()  # this process's platform: it does not change while it runs
DEFAULT_CONFIG_PATH = DEFAULTS.config_file

# The API hosts of the providers AI coding tools talk to. Only these are ever decrypted.
DEFAULT_TARGET_HOSTS: tuple[str, ...] = (
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.x.ai",
    "api.deepseek.com",
    "api.groq.com",
    "openrouter.ai",
)

HOSTNAME_RE = hostpatterns.HOSTNAME_RE


@dataclass(frozen=True)
class RedirectConfig:
    backend: str = "auto"
    scope: str = "targets"
    ports: tuple[int, ...] = (443,)
    proxy_port: int = 8443
    block_quic: bool = True
    # DNS refresh of the target addresses: never wait longer than this between lookups, and keep
    # an address that vanished from DNS this long (clients may hold it in their own caches).
    dns_refresh_max_s: int = 300
    dns_grace_s: int = 900
    # Gateway mode: TCP forwarded from containers/VMs behind these interfaces (docker0, virbr0)
    # is redirected too, IPv4 only (see llmtap.platform.linux.gateway for IPv6).
    gateway_interfaces: tuple[str, ...] = ()
    # Connection limits. Each user's concurrent connections into the proxy are capped by the
    # kernel (nft; 0 = no cap), so one user's flood cannot use up the proxy's descriptors; a
    # connection with no traffic either way for idle_timeout_s is closed.
    max_connections_per_user: int = 512
    idle_timeout_s: int = 600


@dataclass(frozen=True)
class TargetsConfig:
    hosts: tuple[str, ...] = DEFAULT_TARGET_HOSTS
    extra_hosts: tuple[str, ...] = ()

    @property
    def all_hosts(self) -> tuple[str, ...]:
        """Every entry, normalised: names and wildcard patterns (llmtap.hostpatterns)."""
        return tuple(dict.fromkeys(hostpatterns.normalise(h) for h in (*self.hosts, *self.extra_hosts)))

    def host_set(self) -> hostpatterns.HostSet:
        return hostpatterns.HostSet.of(self.all_hosts)


@dataclass(frozen=True)
class UpstreamConfig:
    extra_ca: str = ""  # PEM bundle trusted in addition to the system roots
    # Verified upstream connections a client leaves idle are kept for the next client, up to
    # pool_per_host per address and server name (0: never), each closed after pool_idle_s idle.
    pool_per_host: int = 4
    pool_idle_s: int = 30


@dataclass(frozen=True)
class RecordsConfig:
    max_files: int = 10_000  # records in records_dir before the oldest 20% go to archive/
    archive_after_days: int = 30  # archived records older than this are folded into YYYY-MM.tar.gz
    delete_after_days: int = 0  # 0 keeps everything; else monthly archives older than this go
    max_body_bytes: int = 262_144  # of each body kept for the Markdown twin
    markdown: bool = True
    queue_size: int = 1024  # records waiting for the writer; beyond it they are dropped and counted


@dataclass(frozen=True)
class PricesConfig:
    """The maintained price data (genai-prices). `llmtap prices update` fetches it on demand; with
    update_hours > 0 the daemon fetches it that often too (opt-in: the machine must be online)."""

    update_hours: float = 0.0
    url: str = "https://raw.githubusercontent.com/pydantic/genai-prices/refs/heads/main/prices/new_data/v2/data.json"


@dataclass(frozen=True)
class DashboardConfig:
    daily_budget_usd: float = 0.0  # 0: no budget gauge or alerts
    alert_at: tuple[float, ...] = (0.5, 0.8, 1.0)  # fractions of the budget that alert once a day
    bell: bool = True


@dataclass(frozen=True)
class BudgetsConfig:
    """Where budget alerts go besides the log, the live feed and a desktop notification."""

    webhook: str = ""  # an https:// URL that gets each alert as a JSON POST ("" = none)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus /metrics and /health, served by the supervisor ("" = off), e.g. "127.0.0.1:9464".
    Loopback unless allow_non_loopback is set too, and then only with a bearer_token (SPEC:
    nothing listens on a non-loopback address unless told)."""

    listen: str = ""
    allow_non_loopback: bool = False
    bearer_token: str = ""  # when set, every request must carry "Authorization: Bearer <it>"

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen, "metrics.listen") if self.listen else None


@dataclass(frozen=True)
class LokiConfig:
    url: str = ""  # e.g. "http://127.0.0.1:3100" (the push path is added); "" = off
    tenant: str = ""  # X-Scope-OrgID, for a multi-tenant Loki
    headers: tuple[str, ...] = ()  # "name=value" pairs (auth)


@dataclass(frozen=True)
class ClickhouseConfig:
    url: str = ""  # the HTTP interface, e.g. "http://127.0.0.1:8123"; "" = off
    database: str = "llmtap"
    table: str = "exchanges"
    user: str = ""
    password: str = ""
    bodies: bool = False  # the request and response bodies too (masked, capped as the Markdown's)


@dataclass(frozen=True)
class ExportConfig:
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces; "" = off
    otlp_metrics: bool = True  # and gen_ai.client.* metrics to the sibling /v1/metrics
    headers: tuple[str, ...] = ()  # "name=value" pairs sent with every OTLP export (auth tokens)
    service_name: str = "llmtap"
    timeout_s: int = 5
    # One spool for every exporter: batches kept on disk while a store is down or slow.
    spool_max_files: int = 1000
    spool_max_mb: int = 256
    loki: LokiConfig = field(default_factory=LokiConfig)
    clickhouse: ClickhouseConfig = field(default_factory=ClickhouseConfig)


@dataclass(frozen=True)
class InstallConfig:
    """Where `llmtap install` puts things. `root` is prepended to every system path it touches
    (these, the trust store, /etc/passwd, /etc/os-release, users' NSS databases): tests install
    into a temporary tree. state_dir, records_dir and run_dir are used as they are."""

    root: Path = Path("/")
    public_dir: Path = DEFAULTS.public_dir  # world-readable copy of the CA and the CA bundle
    profile_script: Path = Path("/etc/profile.d/llmtap.sh")
    environment_file: Path = Path("/etc/environment.d/90-llmtap.conf")  # systemd user sessions
    unit_dir: Path = Path("/etc/systemd/system")
    log_file: Path = DEFAULTS.log_file  # the detached or Windows service's output (no journal)
    service: str = "auto"  # auto | systemd | detached
    trust: str = "auto"  # auto | debian | fedora | arch
    nss: bool = True  # also the NSS databases of local users (Chrome, Firefox) if certutil exists
    command: str = ""  # the llmtap executable the service runs; "" = the one running install


@dataclass(frozen=True)
class ExplicitConfig:
    """A regular HTTP/CONNECT proxy with the same pipeline ("" = off), e.g. "127.0.0.1:8890"."""

    listen: str = ""
    # Loopback only unless this is set too: on any other address the proxy is open to whoever can
    # reach it, and it injects this machine's real keys into their requests (SPEC: nothing listens
    # on a non-loopback address). Remote machines get it through `llmtap tunnel` instead.
    allow_non_loopback: bool = False

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


@dataclass(frozen=True)
class RulesConfig:
    """Request filter rules live in state_dir/rules.db (`llmtap rules`); this is how they run.
    Protected fields are never changed by text_replace rules nor scanned by DLP; the syntax is
    "key", "key.key" or "type:key" (see llmtap.rules.strings)."""

    protected_fields: tuple[str, ...] = DEFAULT_PROTECTED_FIELDS
    extra_protected_fields: tuple[str, ...] = ()

    @property
    def all_protected_fields(self) -> tuple[str, ...]:
        return (*self.protected_fields, *self.extra_protected_fields)


@dataclass(frozen=True)
class DlpActions:
    """Per built-in detector: redact | block | alert | off; "" = dlp.default_action."""

    aws_access_key: str = ""
    aws_secret_key: str = ""
    gcp_service_account: str = ""
    github_token: str = ""
    gitlab_token: str = ""
    slack_token: str = ""
    private_key: str = ""
    jwt: str = ""
    llm_api_key: str = ""
    credit_card: str = ""
    held_key: str = ""  # a real key llmtap holds (secrets set), by value, in a request body


@dataclass(frozen=True)
class DlpPattern:
    """A user-defined detector ([[dlp.patterns]]): an RE2 regex; a group named `secret`
    narrows what is redacted."""

    name: str = ""
    pattern: str = ""
    action: str = ""  # "" = dlp.default_action


@dataclass(frozen=True)
class DlpConfig:
    enabled: bool = True
    default_action: str = "redact"  # redact | block | alert | off
    actions: DlpActions = field(default_factory=DlpActions)
    patterns: tuple[DlpPattern, ...] = ()


@dataclass(frozen=True)
class Config:
    state_dir: Path = DEFAULTS.state_dir
    records_dir: Path = DEFAULTS.records_dir
    run_dir: Path = DEFAULTS.run_dir  # control socket (Windows: status file) and pidfile
    service_user: str = "llmtap"  # the unprivileged user (and group) the proxy worker runs as
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    explicit: ExplicitConfig = field(default_factory=ExplicitConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    prices: PricesConfig = field(default_factory=PricesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    dlp: DlpConfig = field(default_factory=DlpConfig)
    source: Path | None = field(default=None, compare=False)

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The file to read and whether the user named it (a named file must exist)."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get(CONFIG_ENV):
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path, named = config_path(explicit)
    if not path.exists():
        if named:
            raise UsageError(f"config file {path} does not exist (check --config or {CONFIG_ENV})")
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    config: Config = build(Config, raw, prefix="")
    config = dataclasses.replace(config, source=path)
    validate(config)
    return config
