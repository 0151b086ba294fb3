"""Prometheus metrics of one agent, in a registry of its own (no process globals).

Names follow ``evidence_keeper_<name>_<unit>[_total]``; labels are bounded sets (reasons,
operations, sink names from configuration), never pod or file names. A byte counts as lost
only when it is really gone, never for an operation that will be retried.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from evidence_keeper.version import BuildInfo, build_info


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *,
                 build: BuildInfo | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._add_process_metrics(r, build or build_info())
        self.captured_bytes = Counter(
            "evidence_keeper_captured_bytes",
            "Bytes of container logs made durable (fsynced) in the local spool.",
            registry=r,
        )
        self.shipped_bytes = Counter(
            "evidence_keeper_shipped_bytes",
            "Raw (uncompressed) log bytes the store confirmed.",
            registry=r,
        )
        self.unshipped_bytes = Gauge(
            "evidence_keeper_unshipped_bytes",
            "Captured bytes not yet confirmed by the store (spool backlog).",
            registry=r,
        )
        self.oldest_unshipped_age = Gauge(
            "evidence_keeper_oldest_unshipped_age_seconds",
            "Age of the oldest captured byte the store has not confirmed; 0 when caught up.",
            registry=r,
        )
        self.lost_bytes = Counter(
            "evidence_keeper_lost_bytes",
            "Bytes of container logs known to be lost, by reason (see /gaps for offsets).",
            ["reason"],
            registry=r,
        )
        self.loss_events = Counter(
            "evidence_keeper_loss_events",
            "Loss gaps recorded, by reason, including holes of unknown length.",
            ["reason"],
            registry=r,
        )
        self.task_restarts = Counter(
            "evidence_keeper_task_restarts",
            "Restarts of the agent's long-lived tasks after a failure or an unexpected finish"
            " (each one is a bug or a fault worth a look; the log names it).",
            ["task"],
            registry=r,
        )
        self.ship_latency = Histogram(
            "evidence_keeper_ship_latency_seconds",
            "Time from capture of a segment's first byte to the store confirming it.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 900, 3600),
            registry=r,
        )
        self.container_restarts = Counter(
            "evidence_keeper_container_restarts",
            "Container restarts seen on this node.",
            registry=r,
        )
        self.previous_logs = Counter(
            "evidence_keeper_previous_logs",
            "Previous-instance logs after a restart, by capture outcome.",
            ["outcome"],
            registry=r,
        )
        self.open_gaps = Gauge(
            "evidence_keeper_open_gaps",
            "Gaps currently open in the ledger, by kind.",
            ["kind"],
            registry=r,
        )
        self.spool_errors = Counter(
            "evidence_keeper_spool_errors",
            "Failed file operations (retried), by operation.",
            ["op"],
            registry=r,
        )
        self.tailed_files = Gauge(
            "evidence_keeper_tailed_files",
            "Container log files being tailed: open, or closed while idle or waiting for a"
            " descriptor (see evidence_keeper_open_files for descriptors).",
            registry=r,
        )
        self.sink_up = Gauge(
            "evidence_keeper_sink_up",
            "1 when the latest check of a sink succeeded, 0 when it failed.",
            ["sink", "check"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "evidence_keeper_spool_bytes",
            "Bytes held in the local spool.",
            registry=r,
        )
        self.spool_max_bytes = Gauge(
            "evidence_keeper_spool_max_bytes",
            "The spool budget (spool_max_bytes).",
            registry=r,
        )
        self.ship_errors = Counter(
            "evidence_keeper_ship_errors",
            "Failed store operations (retried), by operation.",
            ["op"],
            registry=r,
        )
        self.segments_shipped = Counter(
            "evidence_keeper_segments_shipped",
            "Segments the store confirmed.",
            registry=r,
        )
        self.read_errors = Counter(
            "evidence_keeper_read_errors",
            "Failed reads of container log files (retried), by errno name.",
            ["errno"],
            registry=r,
        )
        self.streams = Gauge(
            "evidence_keeper_streams",
            "Container instances (streams) tracked.",
            registry=r,
        )
        # -- the HTTP API's guard (v2: the API never endangers capture) -------------------
        self.http_connections = Gauge(
            "evidence_keeper_http_connections",
            "HTTP connections currently open (capped by http_max_connections).",
            registry=r,
        )
        self.http_connections_rejected = Counter(
            "evidence_keeper_http_connections_rejected",
            "HTTP connections closed at once because the cap was reached and all were busy.",
            registry=r,
        )
        self.http_connections_closed = Counter(
            "evidence_keeper_http_connections_closed",
            "HTTP connections closed by the agent, by reason (evicted, idle_timeout,"
            " header_timeout, request_timeout).",
            ["reason"],
            registry=r,
        )
        self.http_accept_errors = Counter(
            "evidence_keeper_http_accept_errors",
            "Failed accept() calls on the HTTP port (retried), by errno name.",
            ["errno"],
            registry=r,
        )
        self.ledger_unshipped_records = Gauge(
            "evidence_keeper_ledger_unshipped_records",
            "Gap ledger records (gap changes) not yet in the store's ledger objects.",
            registry=r,
        )
        # Replay (issue 15): lines the automatic backfill put back into a sink, by target.
        self.replayed_lines = Counter(
            "evidence_keeper_replayed_lines",
            "Log lines replayed into a sink after its outage and acknowledged by it, by target.",
            ["target"],
            registry=r,
        )
        self._init_real_node(r)

    def _init_real_node(self, r: CollectorRegistry) -> None:
        """Descriptors, skipped paths, the log root and change watching (issue 10)."""
        self.open_files = Gauge(
            "evidence_keeper_open_files",
            "File descriptors open in the agent process (all of them, not only log files).",
            registry=r,
        )
        self.fd_limit = Gauge(
            "evidence_keeper_open_files_limit",
            "The soft RLIMIT_NOFILE after start-up raised it to the hard limit.",
            registry=r,
        )
        self.fd_tail_budget = Gauge(
            "evidence_keeper_open_files_budget",
            "Descriptors the tail path may bring the process up to (limit minus fd_reserve).",
            registry=r,
        )
        self.skipped_files = Counter(
            "evidence_keeper_skipped_files",
            "Log paths never followed (symlinked directories, links outside"
            " log_symlink_roots), counted once per path, by reason.",
            ["reason"],
            registry=r,
        )
        self.log_root_up = Gauge(
            "evidence_keeper_log_root_up",
            "1 when the log root lists pod directories; 0 while it is missing, or empty while"
            " the agent tails streams (a remount): nothing is ended meanwhile.",
            registry=r,
        )
        self.unlisted_dirs = Gauge(
            "evidence_keeper_unlisted_directories",
            "Log directories whose last listing failed or came back empty (streams kept).",
            registry=r,
        )
        self.watch_mode = Gauge(
            "evidence_keeper_watch_inotify",
            "1 while changes are learnt from inotify, 0 while polling.",
            registry=r,
        )

    def _add_process_metrics(self, r: CollectorRegistry, build: BuildInfo) -> None:
        """``build_info`` and the standard ``process_*`` metrics (CPU, memory, descriptors,
        start time), and no ``_created`` series: they double every counter's series and no
        rule or dashboard reads them. prometheus_client's switch for that is process-wide
        (read at each scrape); the agent is the only exporter in its process."""
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.build_info = Gauge(
            "evidence_keeper_build_info",
            "Always 1; the labels say which build runs (version, source revision).",
            ["version", "revision"],
            registry=r,
        )
        self.build_info.labels(version=build.version, revision=build.revision).set(1)
        ProcessCollector(registry=r)
