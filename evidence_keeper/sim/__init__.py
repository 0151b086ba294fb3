"""A simulated node log tree (kubelet + container runtime) and the Nov 10 incident replay.

:class:`KubeletSim` writes real files the way kubelet and containerd/Docker do and keeps the
byte-exact truth of every stream (``record``); tests compare an agent's export against it.
:mod:`evidence_keeper.sim.scenario` replays the sock-shop incident for ``make demo``.
"""

from evidence_keeper.sim.kubelet import (
    SIM_EPOCH,
    KubeletSim,
    LogFormat,
    SimClock,
    churn,
    docker_json_line,
    rfc3339nano,
    rfc3339nano_fixed,
    split_rotated_name,
)
from evidence_keeper.sim.scenario import (
    PAYMENT_FAILED_COUNT,
    PAYMENT_FAILED_MARKER,
    ScenarioStep,
    nov10_incident,
    payment_failed_lines,
    play,
)

__all__ = [
    "PAYMENT_FAILED_COUNT",
    "PAYMENT_FAILED_MARKER",
    "SIM_EPOCH",
    "KubeletSim",
    "LogFormat",
    "ScenarioStep",
    "SimClock",
    "churn",
    "docker_json_line",
    "nov10_incident",
    "payment_failed_lines",
    "play",
    "rfc3339nano",
    "rfc3339nano_fixed",
    "split_rotated_name",
]
