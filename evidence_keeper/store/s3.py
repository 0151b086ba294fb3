"""The S3 store backend (boto3; any S3-compatible endpoint through ``s3_endpoint_url``).

Every PUT sends ``ChecksumAlgorithm=SHA256``: the server verifies the body it stored against
the checksum the client computed, so a segment is acknowledged only if the bytes arrived
intact. Bodies above 16 MiB go up as multipart uploads with a SHA-256 checksum per part
(8 MiB parts); a failed multipart upload is aborted so no invisible parts accrue cost.

Credentials come from boto3's standard chain: environment, shared files, web identity (IRSA),
container and instance profiles. Optional server-side encryption (``sse``: ``AES256`` or
``aws:kms`` with ``sse_kms_key_id``) and, with ``object_lock_days > 0``, COMPLIANCE retention
on every object.

Errors are classified once, here: a missing bucket or a refused signature cannot heal by
retrying and are reported as non-retryable with one clear sentence (at start-up they stop the
agent); throttling, 5xx and connection failures are retryable and handled by the shipper's
back-off. boto3's own retries are kept small (standard mode, 3 attempts) so the shipper's
circuit breaker, not a hidden retry loop, decides the pace.

Missing credentials are retryable: on a booting node the IRSA / Pod Identity token may not be
mounted yet. boto3 resolves credentials once per session, so after a credentials error the
client is dropped and the next call builds a fresh session, which reads the provider chain
(environment, shared files, token files) again.

Writes are made without boto3's hidden retries (one attempt per call) so that their failure
can be classified exactly: a failure before the request was sent (connection refused, connect
timeout, 4xx) is definite; any other (read timeout, reset connection, 5xx) is *ambiguous* —
the object may be stored — and the shipper asks the store (HEAD) before trying again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from evidence_keeper.store.base import CannotLock, ObjectMissing, StoreError, safe_key

MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
_FATAL_CODES = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    "InvalidAccessKeyId": "the AWS access key id is not valid",
    "SignatureDoesNotMatch": "the AWS secret key does not match (signature refused)",
    "AccessDenied": "access denied to bucket {bucket} (check the IAM policy)",
    "403": "access denied to bucket {bucket} (check the IAM policy and credentials)",
    "404": "bucket {bucket} does not exist",
    "InvalidBucketName": "{bucket} is not a valid bucket name",
    "InvalidRequest": "the request was refused: {message}",
}
# Credentials that may be replaced while the agent runs (rotated keys, a refreshed token).
_STALE_CREDENTIAL_CODES = {"InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
                           "ExpiredTokenException"}


class S3Store:
    scheme = "s3"
    check_name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        object_lock_days: int = 0,
        client: Any = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.object_lock_days = object_lock_days
        self._config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=32,
            # The server must verify the SHA-256 we send; do not let botocore swap it for CRC.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._put_config = self._config.merge(Config(retries={"max_attempts": 1}))
        self._client = client
        self._put_client = client
        self._fixed_client = client is not None
        self._client_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Store:
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"store_url {url!r} names no bucket", retryable=False)
        known = {"endpoint_url", "sse", "sse_kms_key_id", "object_lock_days", "client"}
        return cls(bucket, prefix, **{k: v for k, v in options.items() if k in known})

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    @property
    def client(self) -> Any:
        # boto3 clients are thread-safe once created; creating one is not.
        with self._client_lock:
            if self._client is None:
                session = boto3.session.Session()
                self._client = session.client(
                    "s3", endpoint_url=self.endpoint_url, config=self._config)
            return self._client

    @property
    def put_client(self) -> Any:
        """The client for writes: one attempt per call, so a failure can be classified."""
        with self._client_lock:
            if self._put_client is None:
                session = boto3.session.Session()
                self._put_client = session.client(
                    "s3", endpoint_url=self.endpoint_url, config=self._put_config)
            return self._put_client

    def _forget_credentials(self) -> None:
        """Drop the clients: the next call builds a fresh session that resolves credentials
        again (a token file mounted late, a shared credentials file written later)."""
        if self._fixed_client:
            return
        with self._client_lock:
            self._client = None
            self._put_client = None

    def _key(self, key: str) -> str:
        safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, action: str, key: str | None = None, *,
               write: bool = False) -> StoreError:
        what = f"{self.describe()}: {action}" + (f" {key}" if key else "")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            self._forget_credentials()
            return StoreError(
                f"{what}: no AWS credentials found (environment, shared files, web identity"
                " or instance profile)")
        if isinstance(exc, CredentialRetrievalError):
            self._forget_credentials()  # e.g. a web identity token file not mounted yet
            return StoreError(f"{what}: cannot retrieve AWS credentials ({exc})")
        if isinstance(exc, ClientError):
            return self._client_error(exc, what, key, write=write)
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            # Never connected: the request was not sent, so a write did not happen.
            return StoreError(f"{what}: cannot connect to the S3 endpoint ({exc})")
        # A read timeout, a reset or closed connection: a write may have been stored.
        return StoreError(f"{what}: {exc}", ambiguous=write)

    def _client_error(self, exc: ClientError, what: str, key: str | None, *,
                      write: bool) -> StoreError:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchKey" or (key is not None and code in ("404", "NotFound")):
            return ObjectMissing(key or "")
        if code in _STALE_CREDENTIAL_CODES:
            self._forget_credentials()
        template = _FATAL_CODES.get(code)
        if template is not None:
            return StoreError(f"{what}: " + template.format(bucket=self.bucket,
                                                            message=message),
                              retryable=False)
        retryable = status >= 500 or status in (0, 408, 429) or code in (
            "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException")
        # A 5xx answers a request the server received: it may have stored the object.
        return StoreError(f"{what}: {code or status} {message}".strip(), retryable=retryable,
                          ambiguous=write and (status >= 500 or status == 0))

    def _put_args(self, meta: Mapping[str, str], retain_until: datetime | None) -> dict[str, Any]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Metadata": dict(meta),
            "ChecksumAlgorithm": "SHA256",
            "ContentType": "application/octet-stream",
        }
        if self.sse:
            args["ServerSideEncryption"] = self.sse
            if self.sse == "aws:kms" and self.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.sse_kms_key_id
        if retain_until is not None:
            args["ObjectLockMode"] = "COMPLIANCE"
            args["ObjectLockRetainUntilDate"] = retain_until
        return args

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        full = self._key(key)
        args = self._put_args(meta, retain_until)
        try:
            if len(body) > MULTIPART_THRESHOLD:
                self._multipart(full, body, args)
            else:
                self.put_client.put_object(Key=full, Body=body, **args)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot put", key, write=True) from exc

    def _multipart(self, full: str, body: bytes, args: dict[str, Any]) -> None:
        up = self.client.create_multipart_upload(Key=full, **args)
        upload_id = up["UploadId"]
        parts = []
        try:
            view = memoryview(body)
            for n, start in enumerate(range(0, len(body), PART_SIZE), start=1):
                r = self.client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n,
                    Body=bytes(view[start:start + PART_SIZE]), ChecksumAlgorithm="SHA256")
                part = {"ETag": r["ETag"], "PartNumber": n}
                if "ChecksumSHA256" in r:
                    part["ChecksumSHA256"] = r["ChecksumSHA256"]
                parts.append(part)
            self.put_client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                   UploadId=upload_id)
            except (ClientError, BotoCoreError):
                pass
            raise

    def get(self, key: str) -> bytes:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(r["Body"].read())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot get", key) from exc

    def head(self, key: str) -> dict[str, str] | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            err = self._error(exc, "cannot head", key)
            if isinstance(err, ObjectMissing):
                return None
            raise err from exc
        except BotoCoreError as exc:
            raise self._error(exc, "cannot head", key) from exc
        return {str(k).lower(): str(v) for k, v in r.get("Metadata", {}).items()}

    def list(self, prefix: str) -> Iterator[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot list", prefix) from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "bucket check failed") from exc

    def check_object_lock(self) -> None:
        """Fail with one sentence unless the bucket can lock objects (Object Lock enabled).

        Only a definite answer fails: a store that cannot be reached, or a policy that does
        not allow reading the lock configuration, leaves the question open (logged by the
        caller) and the PUTs' own retention settings are then the check.
        """
        try:
            r = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "ObjectLockConfigurationNotFoundError":
                raise CannotLock(self._no_lock()) from exc
            raise self._error(exc, "cannot read the Object Lock configuration") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "cannot read the Object Lock configuration") from exc
        if r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise CannotLock(self._no_lock())

    def _no_lock(self) -> str:
        return (f"{self.describe()}: object_lock_days={self.object_lock_days} needs Object Lock,"
                f" but bucket {self.bucket} does not have it enabled (create the bucket with"
                " Object Lock, or set object_lock_days: 0)")

    def object_info(self, key: str) -> dict[str, Any]:
        """Raw head_object answer (retention, checksum, encryption) for verify and tests."""
        try:
            r: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot head", key) from exc
        return r
