"""Settings in groups: every flat key in exactly one group, the group views equal the flat."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from evidence_keeper.settings import GROUPS, SETTINGS_KEYS, Settings, load_settings


def test_every_key_is_in_exactly_one_group() -> None:
    seen: dict[str, str] = {}
    for name, cls in GROUPS.items():
        for f in fields(cls):
            assert f.name in SETTINGS_KEYS, f"{name}.{f.name} is not a setting"
            assert f.name not in seen, f"{f.name} is in {seen[f.name]} and {name}"
            seen[f.name] = name
    assert sorted(seen) == sorted(SETTINGS_KEYS), "a new setting needs a group"


def test_groups_read_the_same_values_as_the_flat_keys(tmp_path: Path) -> None:
    s: Settings = load_settings(None, environ={"EK_PROBE_INTERVAL_S": "3"}, overrides={
        "node_name": "n1", "spool_dir": str(tmp_path / "spool"), "listen": "127.0.0.1:0",
        "sink_probes": "dd=dns:example.invalid", "spool_max_bytes": "1GiB"})
    assert s.identity.node_name == "n1"
    assert s.probing.probe_interval_s == 3.0  # the EK_* override, through the group
    assert s.probing.sink_probes == s.sink_probes
    assert s.spooling.spool_max_bytes == 1 << 30
    assert s.spooling.spool_dir == tmp_path / "spool"
    assert s.serving.listen == "127.0.0.1:0"
    assert s.shipping.store_url == s.store_url == f"file://{tmp_path / 'spool'}/store"
    assert s.watching.log_root == s.log_root
    assert s.replaying.replay_targets == ()
