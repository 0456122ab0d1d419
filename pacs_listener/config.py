"""Frozen configuration of the PACS service, passed down the call chain.

Every default is documented on its attribute. Library code never reads environment variables;
``dicom-covid serve`` builds these objects from its flags and an optional TOML file
(:func:`load_toml` + :meth:`ServiceConfig.from_mapping`).

A TOML file mirrors the objects (every key optional)::

    state_dir = "/var/lib/dicom-covid"
    quiet_period = 5.0
    destinations = ["ORTHANC@127.0.0.1:4242"]
    kos_for_suspected = false                 # true: a KOS "Of Interest" with suspected results
    output_dir = "/srv/dicom-covid/out"        # used when there is no destination
    model = "efficientnet_lite0"
    bundle = "/opt/dicom-covid/monai_bundle"
    metrics_port = 9464                       # Prometheus /metrics, /healthz, /readyz
    metrics_host = "127.0.0.1"

    # several nodes sharing one queue (default: SQLite in state_dir, one machine)
    job_store = "postgresql://dicomcovid@db.example.org/dicomcovid"  # password: ~/.pgpass
    storage_root = "/mnt/dicom-covid"         # spool/ and results/, mounted by every node
    node_id = "node-1"                        # default: host name + state folder
    role = "all"                              # all | listener | worker | sender
    lease = 60.0                              # seconds a dead node's jobs stay claimed

    [[stowrs]]                                # DICOMweb STOW-RS destinations (repeatable)
    url = "https://pacs.example.org/dicom-web/studies"
    basic_auth_file = "stow.basic"            # one line "user:password" (mode 0600), or
    token_file = "stow.token"                 # ... one line: a bearer token (not both)
    ca = "pacs-ca.crt"                        # PEM CA bundle for https (default: system store)
    timeout = 60.0

    [scp]
    ae_title = "DICOMCOVID"
    host = "127.0.0.1"
    port = 11112
    allowed_callers = ["ORTHANC", "PACS@10.0.0.5"]
    maximum_associations = 8
    maximum_pdu_size = 65536
    min_free_bytes = 536870912
    require_called_ae = true                 # false: accept any called AE title
    associate_timeout = 10.0                 # connection -> complete A-ASSOCIATE-RQ
    pdu_timeout = 30.0                       # silence in the middle of a PDU
    maximum_associate_rq_size = 262144
    maximum_pending = 32                     # connections not yet associated, in total
    maximum_pending_per_peer = 8             # ... and per peer address
    maximum_image_pixels = 67108864          # rows x columns x frames of an image analysed
    maximum_image_bytes = 268435456          # its decoded size

    [tls]                                     # optional: DICOM TLS on both SCP and SCU
    cert = "server.crt"
    key = "server.key"
    ca = "ca.crt"

    [retry]
    base_delay = 5.0
    max_delay = 600.0
    max_tries = 10

    [abstention]                              # when the model gives no verdict ("indeterminate")
    enabled = true                            # false: every image gets a verdict
    uncertainty_margin = 0.05                 # default: the model's own (chosen on val)
    checks = ["blank_image", "no_lung_fields", "out_of_distribution", "uncertain"]

    [worker]
    max_job_attempts = 3
    disk_retry_base = 5.0                     # waiting for disk space: first delay ...
    disk_retry_max = 120.0                    # ... doubling up to this
"""

from __future__ import annotations

import hashlib
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dicom_covid.errors import DicomCovidError

__all__ = [
    "DEFAULT_AE_TITLE",
    "DEFAULT_PORT",
    "OWN_MARKER",
    "ROLES",
    "AllowedCaller",
    "ConfigError",
    "Destination",
    "RetryPolicy",
    "ScpConfig",
    "SenderConfig",
    "ServiceConfig",
    "StowDestination",
    "TlsConfig",
    "WorkerConfig",
    "load_toml",
]

#: What a ``serve`` node may run (``role = "all"`` runs every one).
ROLES = ("listener", "worker", "sender")

#: AE title the service answers to (and calls destinations with) unless told otherwise.
DEFAULT_AE_TITLE = "DICOMCOVID"
#: Default DICOM port of the service (the registered DICOM port 104 needs root).
DEFAULT_PORT = 11112
#: Prefix of the Manufacturer (``dicom-covid developers``) and Contributing Equipment Manufacturer
#: of every object dicom-covid produces; recognises our own results when a PACS forwards them
#: back (next to the result SOP Instance UIDs the job store keeps).
OWN_MARKER = "dicom-covid"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash


class ConfigError(DicomCovidError):
    """A service setting is malformed (bad ``AE@host:port``, negative delay, ...)."""


def _check_ae(ae: str, what: str) -> str:
    ae = ae.strip()
    if not ae or not _AE_RE.match(ae):
        raise ConfigError(
            f"{what}: {ae!r} is not a valid AE title; use 1-16 printable ASCII characters "
            "without backslash, e.g. DICOMCOVID."
        )
    return ae


@dataclass(frozen=True)
class Destination:
    """A DICOM node results are sent to (C-STORE SCU).

    Attributes
    ----------
    ae_title : str
        Called AE title of the destination.
    host : str
        Host name or IP address.
    port : int
        DICOM port.
    """

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:104``).

        Raises
        ------
        ConfigError
            When the text does not have that form.
        """
        m = re.match(
            r"^(?P<ae>[^@]+)@(?:\[(?P<h6>[^\]]+)\]|(?P<h>[^:\[\]]+)):(?P<port>\d+)$", text.strip()
        )
        if not m:
            raise ConfigError(
                f"destination {text!r} is not of the form AE@host:port, e.g. "
                "ORTHANC@127.0.0.1:4242."
            )
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ConfigError(f"destination {text!r}: port {port} is outside 1-65535.")
        return cls(_check_ae(m["ae"], "destination"), m["h6"] or m["h"], port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb origin server results are sent to with STOW-RS (PS3.18 section 10.5).

    Each result is POSTed to ``url`` in a ``multipart/related; type="application/dicom"`` body.
    The credentials are read from their file at every try (a rotated token is used without a
    restart) and are never logged nor kept in this object.

    Attributes
    ----------
    url : str
        The STOW-RS resource, e.g. ``http://127.0.0.1:8042/dicom-web/studies`` (``http`` or
        ``https``; no user name or password in the URL: use a credentials file).
    basic_auth_file : pathlib.Path or None
        File whose first line is ``user:password`` for HTTP basic authentication (default None).
    token_file : pathlib.Path or None
        File whose first line is a bearer token (default None). At most one of the two.
    ca : pathlib.Path or None
        PEM CA bundle the server certificate of an ``https`` URL must chain to (default None:
        the system trust store).
    timeout : float
        Seconds to connect and to wait for each read of the answer (default 60).
    """

    url: str
    basic_auth_file: Path | None = None
    token_file: Path | None = None
    ca: Path | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        m = re.match(r"^(https?)://([^/?#]+)(/[^?#]*)?$", self.url.strip())
        if not m:
            raise ConfigError(
                f"STOW-RS URL {self.url!r} is not an http(s) URL of a resource, e.g. "
                "http://127.0.0.1:8042/dicom-web/studies."
            )
        if "@" in m[2]:
            raise ConfigError(
                f"STOW-RS URL {m[1]}://...@{m[2].rpartition('@')[2]}: put no credentials in the "
                "URL (they would end up in logs); use a basic-auth or token file."
            )
        object.__setattr__(self, "url", self.url.strip().rstrip("/"))
        if self.basic_auth_file is not None and self.token_file is not None:
            raise ConfigError(
                f"STOW-RS {self.url}: give either a basic-auth file or a token file, not both."
            )
        for path in (self.basic_auth_file, self.token_file, self.ca):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"STOW-RS {self.url}: {path} is not a readable file.")
        if self.basic_auth_file is not None and ":" not in self.read_secret():
            raise ConfigError(
                f"STOW-RS {self.url}: the first line of {self.basic_auth_file} must be "
                "user:password."
            )
        if self.token_file is not None and not self.read_secret():
            raise ConfigError(f"STOW-RS {self.url}: the token file {self.token_file} is empty.")
        if not self.timeout > 0:
            raise ConfigError(f"STOW-RS {self.url}: timeout must be a positive number of seconds.")

    def read_secret(self) -> str:
        """The first line of the credentials file ('' without one).

        Raises
        ------
        ConfigError
            When the file cannot be read.
        """
        path = self.basic_auth_file or self.token_file
        if path is None:
            return ""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"STOW-RS {self.url}: cannot read {path} ({exc}).") from exc
        return lines[0].strip() if lines else ""

    @property
    def auth(self) -> str:
        """``"basic"``, ``"bearer"`` or ``"none"``."""
        if self.basic_auth_file is not None:
            return "basic"
        return "bearer" if self.token_file is not None else "none"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], root: Path) -> StowDestination:
        """Build one from a ``[[stowrs]]`` table; relative paths are taken from ``root``.

        Raises
        ------
        ConfigError
            Unknown keys or malformed values.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown or "url" not in data:
            raise ConfigError(
                f"[[stowrs]]: needs url; unknown setting(s) {', '.join(sorted(unknown)) or '-'}; "
                f"known: {', '.join(sorted(known))}."
            )
        values: dict[str, Any] = {"url": str(data["url"])}
        for key in ("basic_auth_file", "token_file", "ca"):
            if data.get(key):
                p = Path(str(data[key])).expanduser()
                values[key] = p if p.is_absolute() else root / p
        if "timeout" in data:
            values["timeout"] = float(data["timeout"])
        return cls(**values)

    def __str__(self) -> str:
        return f"stowrs:{self.url}"


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE allowed to associate, optionally only from one host.

    Attributes
    ----------
    ae_title : str
        Calling AE title.
    host : str or None
        When set, the association must come from this IP address (compared with the peer
        address as given by the socket, so write an IP, not a host name).
    """

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        """Parse ``AE`` or ``AE@ip``."""
        ae, _, host = text.strip().partition("@")
        host = host.strip("[]") or None
        return cls(_check_ae(ae, "allowed caller"), host)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" if self.host else self.ae_title


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (PS3.15 Annex B) for the SCP and, with the same identity, the SCU.

    Attributes
    ----------
    cert : pathlib.Path
        PEM certificate chain of this node.
    key : pathlib.Path
        PEM private key of ``cert`` (keep it mode 0600).
    ca : pathlib.Path or None
        PEM CA bundle that peers' certificates must chain to. When set, the SCP requires and
        verifies client certificates (mutual TLS) and the SCU verifies the destination's
        certificate and host name. Default None: no client certificates are asked for and the SCU
        uses the system trust store.
    """

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class ScpConfig:
    """The storage SCP that a PACS sends studies to.

    Attributes
    ----------
    ae_title : str
        Our AE title (default ``DICOMCOVID``).
    host : str
        Address to listen on (default ``127.0.0.1``: loopback only; use ``0.0.0.0`` to listen on
        every interface).
    port : int
        TCP port (default 11112).
    allowed_callers : tuple of AllowedCaller
        Calling AE titles (optionally with host) allowed to associate. Empty (the default) accepts
        any calling AE, which is only sensible on loopback; any other AE is rejected with
        "calling AE title not recognised".
    require_called_ae : bool
        Reject associations whose called AE title is not ``ae_title`` with "called AE title
        not recognised" (default True). False accepts any called AE title.
    maximum_associations : int
        Concurrent negotiated associations accepted (default 8); more are rejected as "local
        limit exceeded". Connections that have not yet sent their A-ASSOCIATE-RQ do not count
        (see ``maximum_pending``).
    maximum_pdu_size : int
        Largest P-DATA PDU we announce to peers, in bytes (default 65536; 0 means unlimited).
        Conforming peers never send larger ones; pynetdicom still reads a larger PDU from a peer
        that ignores the limit (what one peer can make us buffer is what it actually sends).
    acse_timeout, dimse_timeout, network_timeout : float
        Seconds to wait for association messages (30), DIMSE messages (60) and any network
        activity before an idle association is closed (60).
    associate_timeout : float
        Seconds a new connection has to finish its TLS handshake and send its complete
        A-ASSOCIATE-RQ (default 10); a connection that does not is closed.
    pdu_timeout : float
        Seconds a peer may stay silent in the middle of a PDU, or leave ours unread, before
        the connection is closed (default 30).
    maximum_associate_rq_size : int
        Largest A-ASSOCIATE-RQ PDU accepted, in bytes after its 6-byte header (default 262144;
        a request proposing 128 presentation contexts with 16 transfer syntaxes each is about
        60 KiB). The announced length is checked before anything more is read.
    maximum_pending : int
        Connections that have not yet sent their A-ASSOCIATE-RQ, in total (default 32). When a
        new connection arrives at the limit, the oldest pending one is closed.
    maximum_pending_per_peer : int
        The same, per peer IP address (default 8): one address can only push out its own
        pending connections.
    maximum_image_pixels, maximum_image_bytes : int
        Largest image analysed: Rows x Columns x Number of Frames (default 64 Mi pixels) and
        decoded bytes (default 256 MiB), read from the header. A candidate image over either is
        refused with 0xA701 (``too_large``) before anything is decoded or spooled, and the
        worker checks the same limits before it decodes a spooled image.
    min_free_bytes : int
        Free space the spool file system must keep (default 512 MiB). Below it every C-STORE is
        answered 0xA700 (out of resources) so the PACS keeps the images and retries later.
    own_marker : str
        Prefix of the Manufacturer or a Contributing Equipment Manufacturer that marks our own
        results (default ``dicom-covid``); such instances are acknowledged and
        skipped, never analysed again.
    tls : TlsConfig or None
        DICOM TLS; default None (plain TCP).
    """

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_callers: tuple[AllowedCaller, ...] = ()
    require_called_ae: bool = True
    maximum_associations: int = 8
    maximum_pdu_size: int = 65536
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    associate_timeout: float = 10.0
    pdu_timeout: float = 30.0
    maximum_associate_rq_size: int = 262144
    maximum_pending: int = 32
    maximum_pending_per_peer: int = 8
    maximum_image_pixels: int = 64 * 2**20
    maximum_image_bytes: int = 256 * 2**20
    min_free_bytes: int = 512 * 1024 * 1024
    own_marker: str = OWN_MARKER
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", _check_ae(self.ae_title, "SCP AE title"))
        if not 0 <= self.port < 65536:
            raise ConfigError(f"SCP port {self.port} is outside 0-65535.")
        if self.maximum_associations < 1:
            raise ConfigError("maximum_associations must be at least 1.")
        if self.min_free_bytes < 0:
            raise ConfigError("min_free_bytes must not be negative.")
        for name in (
            "acse_timeout",
            "dimse_timeout",
            "network_timeout",
            "associate_timeout",
            "pdu_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"{name} must be a positive number of seconds (got {getattr(self, name)!r}); "
                    "a listener without it can be held open forever by a silent peer."
                )
        if self.maximum_associate_rq_size < 68:  # the fixed part of an A-ASSOCIATE-RQ
            raise ConfigError("maximum_associate_rq_size must be at least 68 bytes.")
        if self.maximum_pending < 1 or self.maximum_pending_per_peer < 1:
            raise ConfigError("maximum_pending and maximum_pending_per_peer must be at least 1.")


@dataclass(frozen=True)
class RetryPolicy:
    """Delivery retries with exponential backoff.

    Try ``n`` (1-based) that fails is retried after ``min(max_delay, base_delay * 2 ** (n - 1))``
    seconds; after ``max_tries`` failed tries the delivery is dead-lettered (``dicom-covid retry``
    re-queues it).

    Attributes
    ----------
    base_delay : float
        First delay in seconds (default 5).
    max_delay : float
        Largest delay in seconds (default 600).
    max_tries : int
        Tries before dead-lettering (default 10: about an hour of outage with the defaults).
    """

    base_delay: float = 5.0
    max_delay: float = 600.0
    max_tries: int = 10

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError("retry delays must not be negative.")
        if self.max_tries < 1:
            raise ConfigError("retry max_tries must be at least 1.")

    def delay(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th failed try."""
        return min(self.max_delay, self.base_delay * 2.0 ** max(0, tries - 1))


@dataclass(frozen=True)
class SenderConfig:
    """How results are delivered.

    Attributes
    ----------
    ae_title : str
        Calling AE title used towards destinations (default ``DICOMCOVID``).
    destinations : tuple of Destination
        DICOM nodes every result is sent to.
    stowrs : tuple of StowDestination
        DICOMweb STOW-RS servers every result is sent to (default none).
    output_dir : pathlib.Path or None
        Folder results are copied into (as ``<StudyInstanceUID>/<SOPInstanceUID>.dcm``); may be
        combined with destinations.
    retry : RetryPolicy
        Backoff and dead-lettering.
    poll_interval : float
        Seconds between looks for due deliveries (default 0.25: a cheap SQLite read; results
        are written by the worker process, so the sender finds them by polling).
    acse_timeout, dimse_timeout, network_timeout : float
        Association timeouts towards destinations (30, 20, 60 s). The DIMSE timeout is kept
        short: when pynetdicom loses a C-STORE response under heavy load (seen in
        ``benchmarks/load.py``), delivery stalls for this long before the retry.
    tls : TlsConfig or None
        DICOM TLS towards destinations.
    """

    ae_title: str = DEFAULT_AE_TITLE
    destinations: tuple[Destination, ...] = ()
    stowrs: tuple[StowDestination, ...] = ()
    output_dir: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll_interval: float = 0.25
    acse_timeout: float = 30.0
    dimse_timeout: float = 20.0
    network_timeout: float = 60.0
    tls: TlsConfig | None = None

    def targets(self) -> tuple[str, ...]:
        """Delivery target keys: ``AE@host:port`` per destination, ``stowrs:<url>`` per STOW-RS
        server, ``dir:<path>`` for a folder."""
        out = [str(d) for d in self.destinations]
        out += [str(d) for d in self.stowrs]
        if self.output_dir is not None:
            out.append(f"dir:{Path(self.output_dir).resolve()}")
        return tuple(out)


@dataclass(frozen=True)
class WorkerConfig:
    """The inference worker process.

    Attributes
    ----------
    bundle : pathlib.Path or None
        MONAI bundle folder (default: the bundle shipped with dicom-covid).
    model : str or None
        Model name in the bundle (default: the bundle's default model).
    device : str
        Torch device (default ``cpu``).
    explain : bool
        Compute the Grad-CAM heat map shown in the Secondary Capture (default True).
    poll_interval : float
        Seconds between looks for grouped jobs when idle (default 0.5).
    max_job_attempts : int
        A job whose processing crashed the worker this many times is failed (default 3).
    min_free_bytes : int or None
        Free space the results folder must keep for the worker to write an SR and SC (default
        None: a quarter of the receiving floor ``ScpConfig.min_free_bytes``, so results of
        acknowledged images, whose space the receiving floor reserved, can always be written).
    disk_retry_base, disk_retry_max : float
        A job that cannot write its results for lack of disk space waits ``disk_retry_base``
        seconds (default 5), doubling on each further wait up to ``disk_retry_max`` (default
        120), then tries again by itself; it is never failed for it.
    abstention : dict
        The site's overrides of the model's abstention policy (TOML section ``[abstention]``;
        keys of :class:`dicom_covid.abstention.AbstentionPolicy`: ``enabled``,
        ``uncertainty_margin``, ``ood_threshold``, ``lung_fraction``, ``min_pixel_std``,
        ``max_mode_fraction``, ``checks``). Empty: the model's own policy.
    kos_for_suspected : bool
        Also send a Key Object Selection document (title "Of Interest", its own series in the
        same study) listing each image whose outcome is "suspected", for worklists that raise
        the priority of studies with a KOS (default False). Never for "not suspected" or
        "indeterminate".
    workers : int
        Worker processes (default 1), each with its own copy of the model, sharing the job
        store (claims are exclusive). More than one pays on a machine with spare cores or on
        GPUs; each takes about the model's memory again.
    batch_size : int
        Images (from one or more studies) a worker claims and runs through the network as one
        batch (default 8; 1 disables batching).
    batch_wait : float
        Seconds a worker waits for more ready images when it claimed fewer than
        ``batch_size`` (default 0.05; 0 runs at once with what is ready).
    threads : int or None
        Torch intra-op threads per worker (default None: the CPU cores divided evenly among
        the workers, at least 1).
    """

    bundle: Path | None = None
    model: str | None = None
    device: str = "cpu"
    explain: bool = True
    poll_interval: float = 0.5
    max_job_attempts: int = 3
    min_free_bytes: int | None = None
    disk_retry_base: float = 5.0
    disk_retry_max: float = 120.0
    abstention: dict[str, Any] = field(default_factory=dict)
    kos_for_suspected: bool = False
    workers: int = 1
    batch_size: int = 8
    batch_wait: float = 0.05
    threads: int | None = None

    def __post_init__(self) -> None:
        from dicom_covid.abstention import AbstentionPolicy

        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be between 1 and 64.")
        if not 1 <= self.batch_size <= 256:
            raise ConfigError("batch_size must be between 1 and 256.")
        if not 0 <= self.batch_wait <= 10:
            raise ConfigError("batch_wait must be between 0 and 10 seconds.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1.")

        try:
            AbstentionPolicy.from_facts({}, self.abstention)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[abstention]: {exc}") from exc
        if self.min_free_bytes is not None and self.min_free_bytes < 0:
            raise ConfigError("worker min_free_bytes must not be negative.")
        if not 0 < self.disk_retry_base <= self.disk_retry_max:
            raise ConfigError("disk_retry_base must be positive and at most disk_retry_max.")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``dicom-covid serve`` runs with.

    Attributes
    ----------
    state_dir : pathlib.Path
        Folder (mode 0700) holding ``jobs.sqlite``, ``spool/`` (received images) and
        ``results/`` (SR and SC waiting for delivery). Default ``./dicom-covid-state``.
    scp : ScpConfig
        The listener.
    destinations : tuple of Destination
        Where results are sent. Default none.
    stowrs : tuple of StowDestination
        DICOMweb STOW-RS servers results are sent to. Default none.
    output_dir : pathlib.Path or None
        Folder results are also written to. When there is no destination (DICOM or STOW-RS)
        and no output folder,
        results go to ``<state_dir>/output``.
    quiet_period : float
        Seconds without a new instance after which a study becomes a job (default 5, like
        Orthanc's ``StableAge``).
    retry : RetryPolicy
        Delivery backoff.
    worker : WorkerConfig
        Model and worker settings.
    keep_spool : bool
        Keep received images after their job is delivered (default False: deleted once every
        result of the job is delivered; failed and dead jobs keep theirs for ``retry``).
    metrics_port : int or None
        TCP port of the Prometheus ``/metrics`` endpoint with the ``/healthz`` and ``/readyz``
        probes (see :mod:`pacs_listener.metrics`). Default None: no endpoint.
    metrics_host : str
        Address the metrics endpoint listens on (default ``127.0.0.1``; ``0.0.0.0`` to let a
        Prometheus server on another host scrape it).
    job_store : str or None
        ``postgresql://`` URL of a job store several nodes share (see
        :mod:`pacs_listener.store`). Default None: SQLite, ``<state_dir>/jobs.sqlite``.
    storage_root : pathlib.Path or None
        Folder holding ``spool/`` and ``results/``; with a shared job store, a folder every
        node mounts (NFS/SMB). Default: ``state_dir``.
    node_id : str or None
        This node's name in a shared store (its workers claim jobs as
        ``<node_id>/worker-<pid>``; keep it stable across restarts so a restarting node frees
        its own claims at once). Default: ``<host name>-<8 hex digits of the state folder>``.
    role : str
        What this node runs: ``all`` (default: listener, worker and sender), ``listener``
        (C-STORE SCP and grouping studies into jobs), ``worker`` (the model) or ``sender``
        (deliveries); several comma-separated roles are allowed (``listener,sender``).
    lease : float
        Seconds a claimed job stays claimed without its worker renewing the claim (every
        third of it); after that another worker takes it over (default 60).
    """

    state_dir: Path = Path("dicom-covid-state")
    scp: ScpConfig = field(default_factory=ScpConfig)
    destinations: tuple[Destination, ...] = ()
    stowrs: tuple[StowDestination, ...] = ()
    output_dir: Path | None = None
    quiet_period: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    keep_spool: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    job_store: str | None = None
    storage_root: Path | None = None
    node_id: str | None = None
    role: str = "all"
    lease: float = 60.0

    def __post_init__(self) -> None:
        if self.quiet_period < 0:
            raise ConfigError("quiet_period must not be negative.")
        if self.job_store is not None and not self.job_store.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ConfigError(
                f"job_store must be a postgresql:// URL (got {self.job_store.split('://')[0]}"
                "://...); leave it out for the SQLite store in the state folder."
            )
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ConfigError(
                f"role {self.role!r} is not known; use all, or one or more of "
                f"{', '.join(ROLES)} separated by commas."
            )
        if self.lease < 3:
            raise ConfigError("lease must be at least 3 seconds.")
        if self.node_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.node_id):
            raise ConfigError(
                f"node_id {self.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'."
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port {self.metrics_port} is outside 0-65535.")

    @property
    def db_path(self) -> Path:
        """The SQLite job store (used when there is no ``job_store`` URL)."""
        return Path(self.state_dir) / "jobs.sqlite"

    @property
    def store_location(self) -> str | Path:
        """What :class:`~pacs_listener.jobs.JobStore` opens: the URL or the SQLite file."""
        return self.job_store if self.job_store else self.db_path

    @property
    def storage(self) -> Path:
        """Folder of ``spool/`` and ``results/`` (``storage_root``, else ``state_dir``)."""
        return Path(self.storage_root) if self.storage_root else Path(self.state_dir)

    @property
    def spool_dir(self) -> Path:
        """Received images waiting for (or kept after) analysis."""
        return self.storage / "spool"

    @property
    def results_dir(self) -> Path:
        """Results waiting for delivery."""
        return self.storage / "results"

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this node runs (``all`` spelled out)."""
        if self.role.strip() == "all":
            return ROLES
        return tuple(dict.fromkeys(r.strip() for r in self.role.split(",") if r.strip()))

    @property
    def node(self) -> str:
        """This node's id: ``node_id``, else the host name and a digest of the state folder
        (stable across restarts; two nodes on one machine differ by their state folders)."""
        if self.node_id:
            return self.node_id
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:48] or "node"
        digest = hashlib.sha256(str(Path(self.state_dir).resolve()).encode()).hexdigest()[:8]
        return f"{host}-{digest}"

    @property
    def results_min_free_bytes(self) -> int:
        """Free space the worker keeps when writing results (see ``WorkerConfig``)."""
        if self.worker.min_free_bytes is not None:
            return self.worker.min_free_bytes
        return self.scp.min_free_bytes // 4

    def sender(self) -> SenderConfig:
        """The :class:`SenderConfig` implied by this configuration."""
        out = self.output_dir
        if out is None and not self.destinations and not self.stowrs:
            out = Path(self.state_dir) / "output"
        return SenderConfig(
            ae_title=self.scp.ae_title,
            destinations=self.destinations,
            stowrs=self.stowrs,
            output_dir=out,
            retry=self.retry,
            acse_timeout=self.scp.acse_timeout,
            dimse_timeout=min(self.scp.dimse_timeout, SenderConfig.dimse_timeout),
            network_timeout=self.scp.network_timeout,
            tls=self.scp.tls,
        )

    def override(
        self,
        scp: Mapping[str, Any] | None = None,
        retry: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
        **top: Any,
    ) -> ServiceConfig:
        """A copy with some settings replaced (the CLI's flags over the TOML file's values).

        Parameters
        ----------
        scp, retry, worker : mapping, optional
            Fields of :class:`ScpConfig`, :class:`RetryPolicy` and :class:`WorkerConfig`.
        **top
            Fields of :class:`ServiceConfig` itself.

        Raises
        ------
        ConfigError
            Unknown field or invalid value.
        """
        return _replace_checked(
            self,
            {
                **top,
                "scp": _replace_checked(self.scp, scp, "scp"),
                "retry": _replace_checked(self.retry, retry, "retry"),
                "worker": _replace_checked(self.worker, worker, "worker"),
            },
            "service",
        )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], base: ServiceConfig | None = None, root: Path | None = None
    ) -> ServiceConfig:
        """Build a configuration from a TOML-like mapping, on top of ``base``.

        Parameters
        ----------
        data : mapping
            Keys as in the module docstring; unknown keys are an error.
        base : ServiceConfig, optional
            Values not in ``data`` (default: all defaults).
        root : pathlib.Path, optional
            Relative paths in ``data`` are taken relative to this folder (the TOML file's).

        Raises
        ------
        ConfigError
            Unknown keys or malformed values.
        """
        base = base or cls()
        root = root or Path.cwd()

        def path(v: Any) -> Path:
            p = Path(str(v)).expanduser()
            return p if p.is_absolute() else root / p

        data = dict(data)
        tls_data = data.pop("tls", None)
        scp_data = dict(data.pop("scp", {}) or {})
        retry_data = data.pop("retry", None)
        worker_data = dict(data.pop("worker", {}) or {})
        if "abstention" in data:
            worker_data["abstention"] = dict(data.pop("abstention") or {})
        top: dict[str, Any] = {}
        for key in ("model", "bundle", "device", "explain", "kos_for_suspected"):
            if key in data:
                worker_data[key] = data.pop(key)
        for key, value in data.items():
            if key in ("state_dir", "output_dir", "storage_root"):
                top[key] = path(value)
            elif key in ("job_store", "node_id", "role"):
                top[key] = str(value)
            elif key == "lease":
                top[key] = float(value)
            elif key == "destinations":
                top[key] = tuple(Destination.parse(str(v)) for v in value)
            elif key == "stowrs":
                if isinstance(value, Mapping):
                    value = [value]
                top[key] = tuple(StowDestination.from_mapping(v, root) for v in value)
            elif key in ("quiet_period",):
                top[key] = float(value)
            elif key == "keep_spool":
                top[key] = bool(value)
            elif key == "metrics_port":
                top[key] = int(value)
            elif key == "metrics_host":
                top[key] = str(value)
            else:
                raise ConfigError(f"unknown setting {key!r} in the configuration file.")
        scp = base.scp
        if scp_data or tls_data is not None:
            if "allowed_callers" in scp_data:
                scp_data["allowed_callers"] = tuple(
                    AllowedCaller.parse(str(v)) for v in scp_data["allowed_callers"]
                )
            if tls_data is not None:
                scp_data["tls"] = TlsConfig(
                    cert=path(tls_data["cert"]),
                    key=path(tls_data["key"]),
                    ca=path(tls_data["ca"]) if tls_data.get("ca") else None,
                )
            scp = _replace_checked(scp, scp_data, "scp")
        retry = _replace_checked(base.retry, retry_data, "retry") if retry_data else base.retry
        if "bundle" in worker_data and worker_data["bundle"] is not None:
            worker_data["bundle"] = path(worker_data["bundle"])
        worker = (
            _replace_checked(base.worker, worker_data, "worker") if worker_data else base.worker
        )
        return replace(base, scp=scp, retry=retry, worker=worker, **top)


def _replace_checked(obj: Any, values: Mapping[str, Any] | None, section: str) -> Any:
    names = {f.name for f in fields(obj)}
    unknown = set(values or {}) - names
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(sorted(unknown))} in [{section}]; known: "
            f"{', '.join(sorted(names))}."
        )
    try:
        return replace(obj, **dict(values or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML configuration file.

    Raises
    ------
    ConfigError
        When the file cannot be read or is not valid TOML.
    """
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration file ({exc}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc}).") from exc
