from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from evidence_keeper.settings import (
    ConfigError,
    Settings,
    SinkProbe,
    load_settings,
    parse_duration,
    parse_size,
)

GiB = 1024**3
MiB = 1024**2


def load(tmp_path: Path | None = None, yaml_text: str | None = None, /, **env: str) -> Settings:
    path = None
    if yaml_text is not None:
        assert tmp_path is not None
        path = tmp_path / "ek.yaml"
        path.write_text(yaml_text)
    return load_settings(path, environ=env)


def error(tmp_path: Path | None = None, yaml_text: str | None = None, /, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text, **env)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("config error: ")
    return text


# -- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    s = load_settings(environ={"NODE_NAME": "node-1"})
    assert s.node_name == "node-1"
    assert s.cluster == "default"
    assert s.log_root == Path("/var/log/pods")
    assert s.spool_dir == Path("/var/lib/evidence-keeper")
    assert s.spool_max_bytes == 10 * GiB
    assert s.store_url == "file:///var/lib/evidence-keeper/store"
    assert s.store_scheme == "file"
    assert s.store_dir == Path("/var/lib/evidence-keeper/store")
    assert s.store_bucket is None
    assert s.store_prefix == ""
    assert s.s3_endpoint_url is None
    assert s.object_lock_days == 0
    assert s.compression == "zstd"
    assert s.compression_level == 3
    assert s.flush_interval_s == 5.0
    assert s.segment_max_bytes == 8 * MiB
    assert s.kubernetes == "auto"
    assert s.sink_probes == ()
    assert s.probe_interval_s == 10.0
    assert s.listen == "0.0.0.0:9095"
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 9095)
    assert s.archive_token_file is None


def test_defaults_of_the_tuning_keys() -> None:
    s = load_settings(environ={})
    assert s.discover_interval_s == 0.5
    assert s.tail_interval_s == 0.2
    assert s.commit_interval_s == 0.25
    assert s.shutdown_timeout_s == 20.0
    assert s.ship_concurrency == 4
    assert s.backlog_threshold_s == 60.0
    assert s.log_level == "info"
    assert s.sse is None
    assert s.sse_kms_key_id is None
    assert s.gap_retention_days == 90
    assert s.probe_timeout_s == 5.0
    assert s.probe_failures_before_down == 2
    assert s.probe_successes_before_up == 1


def test_node_name_falls_back_to_the_hostname() -> None:
    assert load_settings(environ={}).node_name == socket.gethostname()
    assert load_settings(environ={"NODE_NAME": "  "}).node_name == socket.gethostname()


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(ValueError, match="frozen"):
        setattr(s, "cluster", "other")  # noqa: B010 - the point is to bypass type checks


def test_store_url_follows_spool_dir(tmp_path: Path) -> None:
    s = load_settings(environ={"EK_SPOOL_DIR": str(tmp_path)})
    assert s.store_url == f"file://{tmp_path}/store"
    assert s.store_dir == tmp_path / "store"


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={"EK_SPOOL_DIR": "spool", "EK_ARCHIVE_TOKEN_FILE": "tok"})
    assert s.spool_dir == tmp_path / "spool"
    assert s.archive_token_file == tmp_path / "tok"
    assert s.store_dir == tmp_path / "spool" / "store"


def test_settings_round_trip_through_model_dump() -> None:
    s = load_settings(
        environ={"EK_SINK_PROBES": "a=h:1,b=https://x/y,c=dns:z", "EK_STORE_URL": "s3://bkt/p"}
    )
    assert Settings.model_validate(s.model_dump()) == s
    assert Settings.model_validate(s.model_dump(mode="json")) == s


# -- precedence -----------------------------------------------------------------------------


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "ek.yaml"
    path.write_text(
        "cluster: from-yaml\nflush_interval_s: 2\nlog_root: /logs\nlisten: 1.2.3.4:80\n"
    )
    env = {"EK_FLUSH_INTERVAL_S": "3s", "EK_LISTEN": "127.0.0.1:9000", "EK_NOT_A_KEY": "x"}
    s = load_settings(path, environ=env, overrides={"listen": "127.0.0.1:0", "cluster": None})
    assert s.cluster == "from-yaml"  # None overrides are "not given"
    assert s.log_root == Path("/logs")
    assert s.flush_interval_s == 3.0
    assert s.listen == "127.0.0.1:0"
    assert s.listen_port == 0


def test_config_path_from_ek_config(tmp_path: Path) -> None:
    path = tmp_path / "ek.yaml"
    path.write_text("cluster: prod\n")
    assert load_settings(environ={"EK_CONFIG": str(path)}).cluster == "prod"
    # An explicit path wins over EK_CONFIG.
    other = tmp_path / "other.yaml"
    other.write_text("cluster: other\n")
    assert load_settings(other, environ={"EK_CONFIG": str(path)}).cluster == "other"


def test_empty_env_values_and_yaml_nulls_mean_default(tmp_path: Path) -> None:
    s = load(tmp_path, "cluster:\nstore_url: null\n", EK_FLUSH_INTERVAL_S="", EK_SSE=" ")
    assert s.cluster == "default"
    assert s.flush_interval_s == 5.0
    assert s.sse is None
    assert s.store_scheme == "file"


def test_empty_yaml_file(tmp_path: Path) -> None:
    assert load(tmp_path, "").cluster == "default"
    assert load(tmp_path, "# only a comment\n").cluster == "default"


def test_node_name_key_beats_the_node_name_variable() -> None:
    s = load_settings(environ={"NODE_NAME": "a", "EK_NODE_NAME": "b"})
    assert s.node_name == "b"


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100", 100),
        (100, 100),
        (4096.0, 4096),
        ("100B", 100),
        ("512KiB", 512 * 1024),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("8MiB", 8 * MiB),
        ("8M", 8 * MiB),
        ("8 MiB", 8 * MiB),
        ("10GiB", 10 * GiB),
        ("10G", 10 * GiB),
        ("1TiB", 1024**4),
        ("64KB", 64_000),
        ("500MB", 500_000_000),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        (".5KiB", 512),
        ("2TB", 2 * 10**12),
    ],
)
def test_size_forms(text: object, expected: int) -> None:
    assert parse_size(text) == expected
    env = {"EK_SEGMENT_MAX_BYTES": str(text), "EK_SPOOL_MAX_BYTES": "10TiB"}
    assert load_settings(environ=env).segment_max_bytes == expected


def test_sizes_from_yaml_numbers(tmp_path: Path) -> None:
    s = load(tmp_path, "spool_max_bytes: 1073741824\nsegment_max_bytes: 1MiB\n")
    assert s.spool_max_bytes == GiB
    assert s.segment_max_bytes == MiB


@pytest.mark.parametrize("bad", ["8XB", "MiB", "-1", "1..5MiB", "8 Mi B", "", "1e3", "ten"])
def test_bad_size_strings(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["8XB", "-5", "1.5.2G", "lots"])
def test_bad_size_is_a_config_error(bad: str) -> None:
    text = error(EK_SPOOL_MAX_BYTES=bad)
    assert text == f"config error: spool_max_bytes: {bad!r} is not a size " + (
        "(examples: 100, 512KiB, 8MiB, 10GiB, 1.5GB)"
    )


def test_sizes_must_be_positive_and_yaml_bools_are_not_sizes(tmp_path: Path) -> None:
    assert "segment_max_bytes: '0' is too small" in error(EK_SEGMENT_MAX_BYTES="0")
    assert "spool_max_bytes: True is not a size" in error(tmp_path, "spool_max_bytes: yes\n")
    assert "spool_max_bytes: 1.5 is not a size" in error(tmp_path, "spool_max_bytes: 1.5\n")


def test_segment_larger_than_spool() -> None:
    text = error(EK_SPOOL_MAX_BYTES="1MiB", EK_SEGMENT_MAX_BYTES="2MiB")
    assert text.startswith("config error: segment_max_bytes: 2097152 is larger than")


# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5.0),
        (5, 5.0),
        (2.5, 2.5),
        ("0.5", 0.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("1.5s", 1.5),
        ("5S", 5.0),
        (" 5s ", 5.0),
    ],
)
def test_duration_forms(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)
    s = load_settings(environ={"EK_FLUSH_INTERVAL_S": str(text)})
    assert s.flush_interval_s == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["5x", "s", "ms5", "5 sec", "1m-30s", "", "nan", "inf"])
def test_bad_duration_strings(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_bad_duration_message_is_exactly_one_line() -> None:
    text = error(EK_FLUSH_INTERVAL_S="5x")
    assert text == "config error: flush_interval_s: '5x' is not a duration (examples: 5, 500ms, 2m)"


@pytest.mark.parametrize("key", ["flush_interval_s", "probe_interval_s", "shutdown_timeout_s"])
@pytest.mark.parametrize("value", ["0", "-1", "0ms"])
def test_durations_must_be_positive(key: str, value: str) -> None:
    text = error(**{f"EK_{key.upper()}": value})
    assert f"{key}: {value!r} is out of range: must be greater than 0" in text


def test_subsecond_durations(tmp_path: Path) -> None:
    assert load_settings(environ={"EK_TAIL_INTERVAL_S": "1s"}).tail_interval_s == 1.0
    assert load_settings(environ={"EK_DISCOVER_INTERVAL_S": "100ms"}).discover_interval_s == 0.1
    assert "discover_interval_s: '2s' is out of range: must be at most 1s" in error(
        EK_DISCOVER_INTERVAL_S="2s"
    )
    assert "tail_interval_s: 1.5 is out of range" in error(tmp_path, "tail_interval_s: 1.5\n")


def test_commit_interval_must_stay_below_one_second() -> None:
    assert load_settings(environ={"EK_COMMIT_INTERVAL_S": "999ms"}).commit_interval_s == 0.999
    text = error(EK_COMMIT_INTERVAL_S="1")
    assert "commit_interval_s: '1' is out of range: must be less than 1s" in text
    assert "durable within one second" in text


def test_yaml_bool_is_not_a_duration(tmp_path: Path) -> None:
    assert "probe_timeout_s: True is not a duration" in error(tmp_path, "probe_timeout_s: on\n")


# -- integers and choices -------------------------------------------------------------------


def test_integers(tmp_path: Path) -> None:
    s = load(tmp_path, "object_lock_days: 30\nship_concurrency: '8'\n", EK_GAP_RETENTION_DAYS="7")
    assert (s.object_lock_days, s.ship_concurrency, s.gap_retention_days) == (30, 8, 7)
    assert "ship_concurrency: '65' is out of range (1..64)" in error(EK_SHIP_CONCURRENCY="65")
    assert "ship_concurrency: '0' is out of range (1..64)" in error(EK_SHIP_CONCURRENCY="0")
    assert "object_lock_days: '-1' is out of range: must be at least 0" in error(
        EK_OBJECT_LOCK_DAYS="-1"
    )
    assert "object_lock_days: 'abc' is not an integer" in error(EK_OBJECT_LOCK_DAYS="abc")
    assert "object_lock_days: 1.5 is not an integer" in error(tmp_path, "object_lock_days: 1.5\n")
    assert "probe_failures_before_down: '0'" in error(EK_PROBE_FAILURES_BEFORE_DOWN="0")


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [("on", "on"), ("off", "off"), ("auto", "auto"), ("'ON'", "on"), ("true", "on"), ("no", "off")],
)
def test_kubernetes_accepts_yaml_booleans(tmp_path: Path, yaml_value: str, expected: str) -> None:
    assert load(tmp_path, f"kubernetes: {yaml_value}\n").kubernetes == expected


def test_choices() -> None:
    assert load_settings(environ={"EK_KUBERNETES": "Off"}).kubernetes == "off"
    assert load_settings(environ={"EK_LOG_LEVEL": "WARN"}).log_level == "warning"
    assert load_settings(environ={"EK_LOG_LEVEL": "debug"}).log_level == "debug"
    assert load_settings(environ={"EK_COMPRESSION": "GZIP"}).compression == "gzip"
    assert "kubernetes: 'maybe' is not one of on, off, auto" in error(EK_KUBERNETES="maybe")
    assert "compression: 'lz4' is not one of zstd, gzip" in error(EK_COMPRESSION="lz4")
    assert "log_level: 'trace' is not one of" in error(EK_LOG_LEVEL="trace")


def test_compression_level_depends_on_compression() -> None:
    assert load_settings(environ={"EK_COMPRESSION_LEVEL": "19"}).compression_level == 19
    text = error(EK_COMPRESSION="gzip", EK_COMPRESSION_LEVEL="12")
    assert text == "config error: compression_level: 12 is out of range for gzip (1..9)"
    assert "compression_level: 20 is out of range for zstd (1..19)" in error(
        EK_COMPRESSION_LEVEL="20"
    )
    assert "compression_level: 0 is out of range" in error(EK_COMPRESSION_LEVEL="0")


def test_sse() -> None:
    s = load_settings(environ={"EK_SSE": "aws:kms", "EK_SSE_KMS_KEY_ID": "arn:aws:kms:k"})
    assert (s.sse, s.sse_kms_key_id) == ("aws:kms", "arn:aws:kms:k")
    assert load_settings(environ={"EK_SSE": "aes256"}).sse == "AES256"
    assert "sse: 'des' is not one of AES256, aws:kms" in error(EK_SSE="des")
    text = error(EK_SSE="AES256", EK_SSE_KMS_KEY_ID="k")
    assert text == "config error: sse_kms_key_id: 'k' requires sse: aws:kms"


def test_cluster_and_node_name_are_checked() -> None:
    assert "cluster: 'a/b' is not a valid name" in error(EK_CLUSTER="a/b")
    assert "cluster: '..' is not a valid name" in error(EK_CLUSTER="..")
    assert "node_name: 'a b' is not a valid node name" in error(EK_NODE_NAME="a b")


# -- store_url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "normal"),
    [
        ("s3://evidence", "evidence", "", "s3://evidence"),
        ("s3://evidence/", "evidence", "", "s3://evidence"),
        ("s3://evidence/logs", "evidence", "logs", "s3://evidence/logs"),
        ("s3://evidence/a/b/", "evidence", "a/b", "s3://evidence/a/b"),
        ("S3://my.bucket-1/x", "my.bucket-1", "x", "s3://my.bucket-1/x"),
    ],
)
def test_s3_store_urls(url: str, bucket: str, prefix: str, normal: str) -> None:
    s = load_settings(environ={"EK_STORE_URL": url})
    assert (s.store_scheme, s.store_bucket, s.store_prefix, s.store_url) == (
        "s3",
        bucket,
        prefix,
        normal,
    )
    assert s.store_dir is None


def test_file_store_url(tmp_path: Path) -> None:
    s = load_settings(environ={"EK_STORE_URL": f"file://{tmp_path}/store/"})
    assert s.store_scheme == "file"
    assert s.store_dir == tmp_path / "store"
    assert s.store_url == f"file://{tmp_path}/store"
    assert s.store_prefix == ""


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://bucket/x", "is not a store URL (expected s3://bucket[/prefix] or file:///"),
        ("bucket/x", "is not a store URL"),
        ("s3://", "invalid bucket name"),
        ("s3://Upper", "invalid bucket name"),
        ("s3://ab", "invalid bucket name"),
        ("s3://under_score", "invalid bucket name"),
        ("s3://bucket/a//b", "invalid prefix"),
        ("s3://bucket/../x", "invalid prefix"),
        ("s3://bucket/x?versionId=1", "is not a store URL"),
        ("file://relative/dir", "expected file:///absolute/dir"),
        ("file:///", "the file-system root"),
    ],
)
def test_bad_store_urls(url: str, reason: str) -> None:
    text = error(EK_STORE_URL=url)
    assert text.startswith(f"config error: store_url: {url!r} ")
    assert reason in text


def test_s3_endpoint_url() -> None:
    s = load_settings(environ={"EK_S3_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert "s3_endpoint_url: 'minio:9000' is not an http(s) URL" in error(
        EK_S3_ENDPOINT_URL="minio:9000"
    )
    assert "s3_endpoint_url" in error(EK_S3_ENDPOINT_URL="http://h:99999")


# -- listen ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "normal"),
    [
        ("0.0.0.0:9095", "0.0.0.0", 9095, "0.0.0.0:9095"),
        ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1:0"),
        (":8080", "0.0.0.0", 8080, "0.0.0.0:8080"),
        ("[::]:9095", "::", 9095, "[::]:9095"),
        ("localhost:80", "localhost", 80, "localhost:80"),
    ],
)
def test_listen(text: str, host: str, port: int, normal: str) -> None:
    s = load_settings(environ={"EK_LISTEN": text})
    assert (s.listen_host, s.listen_port, s.listen) == (host, port, normal)


def test_listen_as_a_yaml_port_number(tmp_path: Path) -> None:
    assert load(tmp_path, "listen: 9100\n").listen == "0.0.0.0:9100"


@pytest.mark.parametrize("bad", ["9095x", "host", "host:", "host:70000", "::1:80", "[::1]80"])
def test_bad_listen(bad: str) -> None:
    assert f"listen: {bad!r} is not a listen address" in error(EK_LISTEN=bad)


# -- sink_probes ----------------------------------------------------------------------------


def test_sink_probes_comma_list() -> None:
    text = "loki=loki.logging:3100, es=https://es.example:9200/_cluster/health,"
    text += "resolver=dns:logs.example.com,plain=http://collector/health,v6=[fd00::1]:514"
    s = load_settings(environ={"EK_SINK_PROBES": text})
    assert s.sink_probes == (
        SinkProbe("loki", "tcp", "loki.logging:3100", "loki.logging", 3100),
        SinkProbe("es", "http", "https://es.example:9200/_cluster/health", "es.example", 9200),
        SinkProbe("resolver", "dns", "logs.example.com", "logs.example.com", None),
        SinkProbe("plain", "http", "http://collector/health", "collector", 80),
        SinkProbe("v6", "tcp", "[fd00::1]:514", "fd00::1", 514),
    )


def test_sink_probes_yaml_list_and_mapping(tmp_path: Path) -> None:
    as_list = load(tmp_path, "sink_probes:\n  - a=h:1\n  - b=https://x\n").sink_probes
    assert [(p.name, p.kind, p.port) for p in as_list] == [("a", "tcp", 1), ("b", "http", 443)]
    as_map = load(tmp_path, "sink_probes:\n  a: h:1\n  b: dns:x\n").sink_probes
    assert [(p.name, p.kind, p.target) for p in as_map] == [("a", "tcp", "h:1"), ("b", "dns", "x")]


def test_sink_probes_empty_forms(tmp_path: Path) -> None:
    assert load_settings(environ={"EK_SINK_PROBES": " , "}).sink_probes == ()
    assert load(tmp_path, "sink_probes: []\n").sink_probes == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("loki", "'loki' is not a probe (expected name=host:port"),
        ("store=s3:443", "'store' is reserved"),
        ("a=h:1,a=h:2", "'a=h:2' repeats the probe name 'a'"),
        ("a=host", "expected host:port"),
        ("a=host:0", "1..65535"),
        ("a=host:99999", "0..65535"),
        ("a=:80", "the host is empty"),
        ("a=dns:", "expected dns:<host name>"),
        ("a=https://", "the URL has no host"),
        ("a=https://h:x", "invalid port"),
        ("bad name=h:1", "the name 'bad name' is invalid"),
        ("=h:1", "the name '' is invalid"),
    ],
)
def test_bad_sink_probes(text: str, reason: str) -> None:
    message = error(EK_SINK_PROBES=text)
    assert message.startswith("config error: sink_probes: ")
    assert reason in message


def test_bad_sink_probe_type_in_yaml(tmp_path: Path) -> None:
    assert "sink_probes: 5 is not a list of probes" in error(tmp_path, "sink_probes: 5\n")
    assert "sink_probes: 5 is not a probe" in error(tmp_path, "sink_probes: [5]\n")


# -- the YAML file and unknown keys ---------------------------------------------------------


def test_unknown_yaml_key_suggests_the_closest(tmp_path: Path) -> None:
    text = error(tmp_path, "flush_interval: 5\n")
    assert text.startswith("config error: flush_interval: unknown key in ")
    assert text.endswith("(did you mean flush_interval_s?)")
    text = error(tmp_path, "spool-max-bytes: 5GiB\n")
    assert text.endswith("(did you mean spool_max_bytes?)")


def test_unknown_yaml_key_without_a_close_match(tmp_path: Path) -> None:
    text = error(tmp_path, "zzzzzz: 1\n")
    assert text == f"config error: zzzzzz: unknown key in {tmp_path / 'ek.yaml'}"


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match=r"^config error: clustr: unknown key \(did you mean"):
        load_settings(environ={}, overrides={"clustr": "x"})


def test_unknown_ek_env_vars_are_ignored() -> None:
    assert load_settings(environ={"EK_FLUSH": "x", "EK_CONFIG": ""}).flush_interval_s == 5.0


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value) == f"config error: {path}: no such file"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path, environ={})


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    text = error(tmp_path, "cluster: [unclosed\nlog_root: /x\n")
    assert text.startswith(f"config error: {tmp_path / 'ek.yaml'}: invalid YAML at line ")


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping of settings, got a list" in error(tmp_path, "- a\n- b\n")


def test_several_errors_report_the_first_and_count_the_rest() -> None:
    text = error(EK_CLUSTER="a/b", EK_FLUSH_INTERVAL_S="5x", EK_LISTEN="nope")
    assert text.startswith("config error: cluster: 'a/b' is not a valid name")
    assert text.endswith("(+2 more)")


def test_long_and_multiline_values_stay_on_one_line() -> None:
    text = error(EK_FLUSH_INTERVAL_S="5\nx" + "y" * 500)
    assert "flush_interval_s" in text
    assert len(text) < 200


def test_direct_construction_errors_convert_to_one_line() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(flush_interval_s="5x")  # type: ignore[arg-type]
    err = ConfigError.from_validation_error(info.value)
    assert err.key == "flush_interval_s"
    assert "\n" not in str(err)
    with pytest.raises(ValidationError) as info:
        Settings(flush_intervl_s=1)  # type: ignore[call-arg]
    err = ConfigError.from_validation_error(info.value)
    assert str(err) == "config error: flush_intervl_s: unknown key (did you mean flush_interval_s?)"


def test_bad_spool_dir_is_reported_under_its_own_key() -> None:
    assert error(EK_SPOOL_DIR="a\0b").startswith("config error: spool_dir: 'a\\x00b' is not a path")
