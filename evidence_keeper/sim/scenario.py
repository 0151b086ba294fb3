"""The Nov 10 sock-shop incident, replayed on a :class:`~evidence_keeper.sim.kubelet.KubeletSim`.

The story (from the post-incident analysis): at 17:57 IST (12:27 UTC) stripe-mock was scaled
to 0. Every order then failed: ``payment`` got ``connection refused`` from stripe-mock and
``orders`` set each order to ``PAYMENT_FAILED``. The Datadog agent could not resolve its log
intake (DNS had regressed), so none of it left the node. Recovery came at 18:16:30 IST. The
next morning at 10:45 IST ``orders`` restarted (its 4th restart) and ``payment`` restarted,
and with the local files gone nothing proved the incident had happened.

:func:`nov10_incident` creates the pods at once (so an agent can be started on an existing
tree) and returns the rest as timed :class:`ScenarioStep` objects spread over about nine
seconds; :func:`play` runs them in real time (or instantly with ``speed=0``). Simulated time
jumps to the incident's real UTC times, so the timestamps in the log lines tell the story.

The replay adds what a node does to the evidence meanwhile: ``orders``' log is rotated twice
(the second rotation gzips the first rotated file, and one ``PAYMENT_FAILED`` line is split
across a rotation), a ``carts`` rollout deletes the old carts pod with its directory, and the
restarts make kubelet delete the instance before the previous one. Each order writes exactly
one ``status updated to PAYMENT_FAILED`` line, so :func:`payment_failed_lines` equals
``orders`` and a demo can check that every one of them was preserved.

Everything is deterministic: order ids, latencies and pod uids come from fixed seeds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from evidence_keeper.sim.kubelet import KubeletSim

NAMESPACE: Final = "sock-shop"
# The two pod names are the real ones from the incident's `kubectl get pods`.
ORDERS_POD: Final = "orders-85dd575fc7-c24ct"
PAYMENT_POD: Final = "payment-5fc5fd7f78-svspw"
FRONT_END_POD: Final = "front-end-6649c54d45-5tr9x"
CARTS_POD: Final = "carts-5b8c9f7d6c-q8n4l"  # deleted by the rollout
CARTS_NEW_POD: Final = "carts-7f6d4b8c9b-wk2zx"
DATADOG_NAMESPACE: Final = "datadog"
DATADOG_POD: Final = "datadog-agent-7xk2p"
ORDERS_RESTARTS_BEFORE: Final = 3  # the Nov 11 restart is the 4th
DEFAULT_ORDERS: Final = 12
PAYMENT_FAILED_MARKER: Final = b"status updated to PAYMENT_FAILED"
PAYMENT_FAILED_COUNT: Final = DEFAULT_ORDERS  # lines written by nov10_incident() with defaults

STRIPE_MOCK_IP: Final = "10.96.142.17"
KUBE_DNS: Final = "10.96.0.10:53"
DD_INTAKE: Final = "agent-http-intake.logs.datadoghq.com"
CUSTOMER_ID: Final = "57a98d98e4b00679b4a830af"

# Incident times (UTC; IST is UTC+05:30).
T_INCIDENT: Final = datetime(2025, 11, 10, 12, 27, 0, tzinfo=UTC)  # 17:57 IST
T_FIRST_ORDER: Final = datetime(2025, 11, 10, 12, 32, 1, tzinfo=UTC)  # 18:02:01 IST
T_SECOND_ORDER: Final = datetime(2025, 11, 10, 12, 32, 12, tzinfo=UTC)  # 18:02:12 IST
T_LAST_ORDER: Final = datetime(2025, 11, 10, 12, 43, 30, tzinfo=UTC)
T_REPORTED: Final = datetime(2025, 11, 10, 12, 44, 0, tzinfo=UTC)  # 18:14 IST
T_RECOVERY: Final = datetime(2025, 11, 10, 12, 46, 30, tzinfo=UTC)  # 18:16:30 IST
T_ROLLOUT: Final = datetime(2025, 11, 10, 13, 5, 0, tzinfo=UTC)
T_RESTARTS: Final = datetime(2025, 11, 11, 5, 15, 0, tzinfo=UTC)  # 10:45 IST
T_DNS_FIXED: Final = datetime(2025, 11, 11, 5, 30, 0, tzinfo=UTC)  # 11:00 IST


@dataclass
class ScenarioStep:
    """One moment of the replay: ``action`` runs ``at_s`` seconds after :func:`play` starts."""

    at_s: float
    description: str
    action: Callable[[KubeletSim], None]


# -- log line styles -------------------------------------------------------------------------


def _spring(sim: KubeletSim, level: str, thread: str, logger: str, msg: str) -> str:
    """Spring Boot's default console pattern, as the Java sock-shop services print it."""
    ts = sim.now()
    return (
        f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond // 1000:03d} {level:>5} 1 --- "
        f"[{thread[-15:]:>15}] {logger:<40} : {msg}"
    )


def _gokit(sim: KubeletSim, **fields: str) -> str:
    """go-kit logfmt, as the Go payment service prints it (to stderr)."""
    ts = sim.now()
    parts = [f"ts={ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond:06d}Z"]
    for key, value in fields.items():
        quoted = " " in value or '"' in value or "=" in value
        parts.append(f"{key}={_logfmt_quote(value) if quoted else value}")
    return " ".join(parts)


def _logfmt_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _datadog(sim: KubeletSim, level: str, where: str, msg: str) -> str:
    ts = sim.now()
    return f"{ts:%Y-%m-%d %H:%M:%S} UTC | CORE | {level} | ({where}) | {msg}"


_ORDERS_CTRL: Final = "w.w.s.orders.controllers.OrdersController"
_ORDERS_APP: Final = "works.weave.socks.orders.OrdersApplication"


def _orders(
    sim: KubeletSim,
    level: str,
    msg: str,
    *,
    thread: str = "http-nio-80-exec-4",
    logger: str = _ORDERS_CTRL,
) -> None:
    sim.write(NAMESPACE, ORDERS_POD, "orders", _spring(sim, level, thread, logger, msg))


def _orders_startup(sim: KubeletSim) -> None:
    for logger, msg in (
        (_ORDERS_APP, f"Starting OrdersApplication v0.4.7 on {ORDERS_POD} with PID 1"),
        ("o.s.b.w.embedded.tomcat.TomcatWebServer", "Tomcat initialized with port(s): 80 (http)"),
        ("org.mongodb.driver.cluster", "Cluster created with settings {hosts=[orders-db:27017]}"),
        (_ORDERS_APP, "Started OrdersApplication in 31.482 seconds (JVM running for 33.107)"),
    ):
        _orders(sim, "INFO", msg, thread="main", logger=logger)


def _payment_startup(sim: KubeletSim) -> None:
    _payment(sim, transport="HTTP", port="80")
    _payment(sim, caller="main.go:82", msg="Payment gateway: http://stripe-mock:12111")
    _payment(sim, caller="main.go:95", msg="Decline amount: 105.00")


def _front_end(sim: KubeletSim, msg: str, *, stream: str = "stdout") -> None:
    sim.write(NAMESPACE, FRONT_END_POD, "front-end", msg, stream=stream)


def _node_http(sim: KubeletSim, request: str, status: int, ms: float, size: int) -> None:
    # morgan's "dev" format, uncoloured (no TTY in a pod).
    _front_end(sim, f"{request} {status} {ms:.3f} ms - {size}")


def _dd_dns_error(sim: KubeletSim) -> None:
    sim.write(
        DATADOG_NAMESPACE,
        DATADOG_POD,
        "agent",
        _datadog(
            sim,
            "WARN",
            "pkg/logs/client/http/destination.go:427 in unconditionalSend",
            f'Could not send payload: Post "https://{DD_INTAKE}/api/v2/logs": dial tcp: lookup '
            f"{DD_INTAKE} on {KUBE_DNS}: no such host",
        ),
    )


# -- the scenario ----------------------------------------------------------------------------


def nov10_incident(sim: KubeletSim, *, orders: int = DEFAULT_ORDERS) -> list[ScenarioStep]:
    """Set up the sock-shop pods on ``sim`` and return the incident as timed steps."""
    if orders < 2:
        raise ValueError("the replay needs at least 2 orders (one line is split by a rotation)")
    rng = random.Random(20251110)
    _setup(sim)

    steps: list[ScenarioStep] = [
        ScenarioStep(
            0.0, "17:57 IST stripe-mock scaled to 0; Datadog agent DNS is broken", _incident_start
        ),
        ScenarioStep(
            0.6,
            "Datadog agent keeps failing to resolve its log intake: nothing ships",
            _dd_dns_error,
        ),
    ]
    # Orders between 1.0 s and 5.4 s; the first two at the times the user reported.
    rotations = {orders // 3: False, (2 * orders) // 3: True}  # index -> split the line?
    span = T_LAST_ORDER - T_SECOND_ORDER
    for i in range(orders):
        when = T_FIRST_ORDER if i == 0 else T_SECOND_ORDER + span * (i - 1) / max(orders - 2, 1)
        at = 1.0 + 4.4 * i / (orders - 1)
        order_id = _object_id(rng, when, i)
        rotate = rotations.get(i) if i > 0 else None
        desc = f"order {order_id} fails: payment connection refused -> PAYMENT_FAILED"
        if rotate is not None:
            desc += "; kubelet rotates orders' log" + (" mid-line" if rotate else "")
        steps.append(
            ScenarioStep(
                round(at, 3),
                desc,
                _order_action(
                    when,
                    order_id,
                    amount=round(rng.uniform(12.0, 99.0), 2),
                    took_ms=rng.uniform(0.4, 3.0),
                    rotate=rotate,
                    trace=(i == orders // 2),
                ),
            )
        )
    steps += [
        ScenarioStep(5.8, "18:14 IST user reports 'Orders still failing'", _reported),
        ScenarioStep(6.2, "18:16:30 IST recovery: stripe-mock scaled back to 1", _recovery),
        ScenarioStep(
            6.8,
            "carts rollout: new carts pod up, old carts pod deleted with its logs",
            _carts_rollout,
        ),
        ScenarioStep(
            7.5,
            "Nov 11 10:45 IST orders restarted (4th restart): kubelet deletes 2.log",
            _restart_orders,
        ),
        ScenarioStep(7.9, "Nov 11 10:45 IST payment restarted (1st restart)", _restart_payment),
        ScenarioStep(
            8.6, "Nov 11 11:00 IST Datadog DNS fixed: too late for Nov 10's logs", _dns_fixed
        ),
    ]
    return steps


def play(
    sim: KubeletSim,
    steps: list[ScenarioStep],
    *,
    speed: float = 1.0,
    on_step: Callable[[ScenarioStep], None] | None = None,
) -> None:
    """Run ``steps`` in order, each at ``at_s / speed`` seconds after the start.

    ``speed=0`` runs them back to back without sleeping. Deadlines are measured from one start
    instant, so slow steps do not push the rest of the replay later. ``on_step`` is called
    after each step's action.
    """
    if speed < 0:
        raise ValueError("speed must be >= 0")
    start = time.monotonic()
    for step in steps:
        if speed > 0:
            delay = start + step.at_s / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        step.action(sim)
        if on_step is not None:
            on_step(step)


def payment_failed_lines(sim: KubeletSim) -> int:
    """How many ``PAYMENT_FAILED`` lines the orders service wrote, counted in the ground truth."""
    return sum(
        sim.record(s).count(PAYMENT_FAILED_MARKER)
        for s in sim.streams()
        if s.namespace == NAMESPACE and s.pod == ORDERS_POD
    )


# -- steps -----------------------------------------------------------------------------------


def _setup(sim: KubeletSim) -> None:
    sim.add_pod(NAMESPACE, FRONT_END_POD, containers=("front-end",))
    sim.add_pod(NAMESPACE, ORDERS_POD, containers=("orders",))
    sim.add_pod(NAMESPACE, PAYMENT_POD, containers=("payment",))
    sim.add_pod(NAMESPACE, CARTS_POD, containers=("carts",))
    sim.add_pod(DATADOG_NAMESPACE, DATADOG_POD, containers=("agent", "trace-agent"))
    _front_end(sim, "App now running in production mode on port 8079")
    # orders had already crashed three times (mongo unreachable at start-up); kubelet keeps
    # only the previous instance, so 0.log is gone by the time 3.log is written.
    for _ in range(ORDERS_RESTARTS_BEFORE):
        _orders_startup(sim)
        _orders(
            sim,
            "ERROR",
            "Application run failed",
            thread="main",
            logger="o.s.boot.SpringApplication",
        )
        # The stack trace: one message, one CRI record per line.
        sim.write(
            NAMESPACE,
            ORDERS_POD,
            "orders",
            "\n\tat ".join(
                (
                    "com.mongodb.MongoTimeoutException: Timed out after 30000 ms while waiting "
                    "to connect.",
                    "com.mongodb.connection.BaseCluster.getDescription(BaseCluster.java:166)",
                    "works.weave.socks.orders.OrdersApplication.main(OrdersApplication.java:21)",
                )
            ),
        )
        sim.restart(NAMESPACE, ORDERS_POD, "orders")
    _orders_startup(sim)
    _payment_startup(sim)
    sim.write(
        NAMESPACE,
        CARTS_POD,
        "carts",
        _spring(
            sim,
            "INFO",
            "main",
            "works.weave.socks.cart.CartApplication",
            "Started CartApplication in 28.911 seconds (JVM running for 30.245)",
        ),
    )
    sim.write(
        DATADOG_NAMESPACE,
        DATADOG_POD,
        "agent",
        _datadog(sim, "INFO", "pkg/logs/logs.go:170 in start", "logs-agent started"),
    )


def _incident_start(sim: KubeletSim) -> None:
    sim.advance_to(T_INCIDENT)
    _dd_dns_error(sim)
    _node_http(sim, "GET /catalogue?size=5", 200, 8.214, 1913)
    sim.write(
        NAMESPACE,
        CARTS_POD,
        "carts",
        _spring(
            sim,
            "INFO",
            "http-nio-80-exec-2",
            "w.w.s.cart.controllers.ItemsController",
            f"Adding item to cart: {CUSTOMER_ID}",
        ),
    )


def _object_id(rng: random.Random, when: datetime, counter: int) -> str:
    """A MongoDB ObjectId as the orders service stores them: 4-byte time, 5 random, 3 counter."""
    return f"{int(when.timestamp()):08x}{rng.getrandbits(40):010x}{0x3A1F00 + counter:06x}"


def _payment(sim: KubeletSim, **fields: str) -> None:
    # go-kit's logger writes to stderr.
    sim.write(NAMESPACE, PAYMENT_POD, "payment", _gokit(sim, **fields), stream="stderr")


def _order_action(
    when: datetime,
    order_id: str,
    *,
    amount: float,
    took_ms: float,
    rotate: bool | None,
    trace: bool,
) -> Callable[[KubeletSim], None]:
    """One failed order, front-end -> orders -> payment -> stripe-mock (refused) and back.

    ``rotate``: ``None`` no rotation; ``False`` kubelet rotates orders' log after the
    ``PAYMENT_FAILED`` line; ``True`` it rotates while that line is half written.
    """

    def action(sim: KubeletSim) -> None:
        sim.advance_to(when)
        _node_http(sim, "GET /cart", 200, 12.503, 187)
        _orders(
            sim,
            "INFO",
            f"Creating order for customer {CUSTOMER_ID} (address "
            f"57a98d98e4b00679b4a830ad, card 57a98d98e4b00679b4a830ae), order id {order_id}",
        )
        _orders(
            sim,
            "DEBUG",
            f"Sending payment request: PaymentRequest{{amount={amount:.2f}, "
            f"customer={CUSTOMER_ID}}}",
            logger="w.w.s.orders.services.AsyncGetService",
        )
        err = (
            f'Post "http://stripe-mock:12111/v1/charges": dial tcp {STRIPE_MOCK_IP}:12111: '
            "connect: connection refused"
        )
        _payment(
            sim,
            level="error",
            caller="service.go:58",
            method="Authorise",
            msg="Payment gateway error",
            err=err,
        )
        _payment(
            sim,
            caller="logging.go:31",
            method="Authorise",
            result="false",
            err="connection refused",
            took=f"{took_ms:.6f}ms",
        )
        _orders(sim, "WARN", f"Payment declined for order {order_id}: Payment gateway error: {err}")
        if trace:
            sim.write(
                NAMESPACE,
                ORDERS_POD,
                "orders",
                "\n\tat ".join(
                    (
                        "works.weave.socks.orders.controllers.OrdersController"
                        f"$PaymentDeclinedException: Payment declined: {err}",
                        "works.weave.socks.orders.controllers.OrdersController.newOrder"
                        "(OrdersController.java:93)",
                        "sun.reflect.NativeMethodAccessorImpl.invoke0(Native Method)",
                    )
                ),
            )
        line = _spring(
            sim,
            "INFO",
            "http-nio-80-exec-4",
            _ORDERS_CTRL,
            f"Order {order_id} status updated to PAYMENT_FAILED",
        )
        if rotate:
            # The runtime had written half the record when kubelet renamed the file; the rest
            # lands in the new 3.log. The stream (and the evidence) must keep it whole.
            rec = sim.render(NAMESPACE, ORDERS_POD, "orders", line)
            cut = rec.index(b"PAYMENT_FAILED") + len(b"PAYMENT")
            sim.rotate(NAMESPACE, ORDERS_POD, "orders", late_write=rec[:cut], then_write=rec[cut:])
        else:
            sim.write(NAMESPACE, ORDERS_POD, "orders", line)
            if rotate is False:
                sim.rotate(NAMESPACE, ORDERS_POD, "orders")
        _node_http(sim, "POST /orders", 406, 1523.412 + took_ms, 268)
        _front_end(
            sim,
            f'Order response: {{"status":406,"error":"Not Acceptable","message":'
            f'"Payment declined for order {order_id}","path":"/orders"}}',
            stream="stderr",
        )

    return action


def _reported(sim: KubeletSim) -> None:
    sim.advance_to(T_REPORTED)
    _node_http(sim, "GET /orders", 200, 31.207, 2288)
    _dd_dns_error(sim)


def _recovery(sim: KubeletSim) -> None:
    sim.advance_to(T_RECOVERY)
    _payment(
        sim,
        caller="logging.go:31",
        method="Authorise",
        result="true",
        err="null",
        took="41.882113ms",
    )
    paid = _object_id(random.Random(T_RECOVERY.timestamp()), T_RECOVERY, 99)
    _orders(sim, "INFO", f"Order {paid} status updated to PAID", thread="http-nio-80-exec-9")
    _node_http(sim, "POST /orders", 201, 204.118, 512)


def _carts_rollout(sim: KubeletSim) -> None:
    sim.advance_to(T_ROLLOUT)
    sim.add_pod(NAMESPACE, CARTS_NEW_POD, containers=("carts",))
    sim.write(
        NAMESPACE,
        CARTS_NEW_POD,
        "carts",
        _spring(
            sim,
            "INFO",
            "main",
            "works.weave.socks.cart.CartApplication",
            "Started CartApplication in 27.406 seconds (JVM running for 29.011)",
        ),
    )
    sim.write(
        NAMESPACE,
        CARTS_POD,
        "carts",
        _spring(
            sim,
            "INFO",
            "Thread-4",
            "o.s.b.w.e.tomcat.GracefulShutdown",
            "Commencing graceful shutdown. Waiting for active requests to complete",
        ),
    )
    sim.delete_pod(NAMESPACE, CARTS_POD)


def _restart_orders(sim: KubeletSim) -> None:
    sim.advance_to(T_RESTARTS)
    sim.restart(NAMESPACE, ORDERS_POD, "orders")
    _orders_startup(sim)


def _restart_payment(sim: KubeletSim) -> None:
    sim.advance_to(T_RESTARTS + timedelta(seconds=4))
    sim.restart(NAMESPACE, PAYMENT_POD, "payment")
    _payment_startup(sim)


def _dns_fixed(sim: KubeletSim) -> None:
    sim.advance_to(T_DNS_FIXED)
    sim.write(
        DATADOG_NAMESPACE,
        DATADOG_POD,
        "agent",
        _datadog(
            sim,
            "INFO",
            "pkg/logs/client/http/destination.go:501 in unconditionalSend",
            f"Connection to the log intake {DD_INTAKE} restored",
        ),
    )
