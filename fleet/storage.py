"""The S3-compatible object store (AWS S3, R2, Garage, MinIO, SeaweedFS) through boto3."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fleet.errors import StorageError, StorageRefused

if TYPE_CHECKING:
    from fleet.settings import FleetSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
#: Answers that say this store refuses us, with what to fix (retrying cannot help).
_REFUSALS: dict[str, str] = {
    "InvalidAccessKeyId": "the access key is unknown to the store: check FLEET_S3_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key is wrong: check FLEET_S3_SECRET_ACCESS_KEY",
    "AccessDenied": "the credentials may not do this: grant the actions in docs/operations.md",
    "403": "the store refused the credentials (403): check FLEET_S3_ACCESS_KEY_ID, "
    "FLEET_S3_SECRET_ACCESS_KEY and the actions in docs/operations.md",
    "401": "the store refused the credentials (401): check FLEET_S3_ACCESS_KEY_ID and "
    "FLEET_S3_SECRET_ACCESS_KEY",
    "NoSuchBucket": "the bucket does not exist: create it or set FLEET_S3_CREATE_BUCKET=true",
    "RequestTimeTooSkewed": "this host's clock is too far from the store's: sync it (NTP)",
    "InvalidBucketName": "the bucket name is invalid: check FLEET_S3_BUCKET",
}
#: A conditional write whose condition failed: someone else wrote first.
_CONFLICT_CODES = frozenset({"412", "PreconditionFailed", "409", "ConditionalRequestConflict"})


def make_s3_client(settings: FleetSettings, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client configured for S3-compatible servers.

    SigV4 (SeaweedFS rejects presigned PUTs without it), checksums only when required (boto3 >= 1.36
    sends checksum headers several S3-compatible servers reject), 'standard' retry mode.

    FLEET_S3_MAX_ATTEMPTS counts attempts, the first included: botocore's ``max_attempts`` key
    counts *retries* (``max_attempts=5`` makes 6 attempts), ``total_max_attempts`` attempts.
    Standard mode retries throttling (503 SlowDown), 5xx, connection errors and read timeouts
    with jittered exponential backoff; a read timeout of 30 s bounds each try.

    ``endpoint_url`` replaces FLEET_S3_ENDPOINT_URL (the presigning client's public endpoint);
    everything else (credentials, region, SigV4, addressing style) stays the same.
    """
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": settings.s3_addressing_style},
        retries={"mode": "standard", "total_max_attempts": max(1, settings.s3_max_attempts)},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=5,
        read_timeout=30,
    )
    key = settings.s3_access_key_id
    secret = settings.s3_secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=key.get_secret_value() if key else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )


class ObjectStore:
    """A bucket: put, get, exists, presign. Every failure becomes a StorageError."""

    def __init__(
        self, settings: FleetSettings, client: Any | None = None, create_bucket: bool = True
    ) -> None:
        """``create_bucket=False`` skips FLEET_S3_CREATE_BUCKET's check (no I/O at all)."""
        self.bucket = settings.s3_bucket
        self.presign_expiry_s = settings.presign_expiry_s
        self.client = client or make_s3_client(settings)
        #: Where presigned URLs point: FLEET_S3_PUBLIC_ENDPOINT_URL, or None for self.client's.
        self.public_endpoint_url = settings.s3_public_endpoint_url or None
        self._make_signer = functools.partial(make_s3_client, settings, self.public_endpoint_url)
        self._signer: Any | None = None
        self._signer_lock = threading.Lock()
        self._conditional: bool | None = None
        #: The canary passed: these credentials may write, read and delete here.
        self.verified = False
        if settings.s3_create_bucket and create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING_CODES:
                raise StorageError(f"cannot reach bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach the S3 endpoint: {exc}") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
            log.info("created bucket %s", self.bucket)
        except ClientError as exc:
            if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StorageError(f"cannot create bucket {self.bucket!r}: {exc}") from exc

    def _request(
        self, what: str, key: str, call: Callable[[], _T], quiet: frozenset[str] = frozenset(),
        quiet_value: Any = None,
    ) -> _T:  # fmt: skip
        """Run one S3 request. A client error whose code is in ``quiet`` gives ``quiet_value``
        (e.g. "no such key": None); every other failure becomes a StorageError naming the
        request and the object."""
        try:
            return call()
        except ClientError as exc:
            if _code(exc) in quiet:
                return cast(_T, quiet_value)
            refusal = refusal_of(exc)
            if refusal is not None:
                raise StorageRefused(
                    f"{what} of s3://{self.bucket}/{key} refused: {refusal} ({exc})"
                ) from exc
            raise StorageError(f"{what} of s3://{self.bucket}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} of s3://{self.bucket}/{key} failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._request("upload", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=content_type))  # fmt: skip

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, _json_bytes(obj), "application/json")

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        data, _ = self._get(key)
        return data

    def get_json(self, key: str) -> Any | None:
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def get_json_tagged(self, key: str) -> tuple[Any | None, str | None]:
        """The object as JSON and its ETag, or (None, None) when it does not exist."""
        data, etag = self._get(key)
        return (None, None) if data is None else (json.loads(data), etag)

    def _get(self, key: str) -> tuple[bytes | None, str | None]:
        def call() -> tuple[bytes | None, str | None]:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(resp["Body"].read()), str(resp.get("ETag") or "") or None

        return self._request("download", key, call, self._absent_codes(), (None, None))

    def put_json_if(self, key: str, obj: Any, etag: str | None) -> bool:
        """Write ``obj`` only if the object is still as we read it: absent (``etag`` None:
        ``If-None-Match: *``) or unchanged (``If-Match: etag``). False when another writer got
        there first (412 Precondition Failed). Stores that ignore the condition (see
        ``honours_conditional_writes``) write unconditionally."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

        def call() -> bool:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=_json_bytes(obj),
                                   ContentType="application/json", **condition)  # fmt: skip
            return True

        return self._request("conditional upload", key, call, _CONFLICT_CODES, False)

    def canary(self, prefix: str = "") -> None:
        """Put, head, get and delete a probe object: the store takes this worker's writes.
        Raises StorageRefused (fix the settings) or StorageError (away: try again later)."""
        key = f"{prefix}fleet-probes/canary-{uuid.uuid4().hex}.txt"
        body = b"diffusion-fleet storage canary"
        self.put_bytes(key, body, "text/plain")
        if not self.exists(key):
            raise StorageRefused(f"s3://{self.bucket}/{key} was written but cannot be found")
        if self.get_bytes(key) != body:
            raise StorageRefused(f"s3://{self.bucket}/{key} reads back other bytes")
        self.delete(key)
        self.verified = True

    def honours_conditional_writes(self, probe_prefix: str = "") -> bool:
        """Probe whether the store refuses a conditional write whose condition fails (S3 since
        2024, SeaweedFS since 3.97, MinIO, R2). Without it, failure records fall back to read
        then write, which a concurrent success can race (documented in docs/reliability.md).
        Raises StorageError when the store is away or slow (the probe says nothing then)."""
        key = f"{probe_prefix}fleet-probes/conditional-{uuid.uuid4().hex}.json"
        self.put_json(key, {"probe": 1})
        try:
            return not self.put_json_if(key, {"probe": 2}, etag=None)
        except (StorageError, StorageRefused) as exc:
            if isinstance(exc, StorageError) and not _answered_unsupported(exc):
                raise
            log.warning("conditional-write probe refused (%s); using read-then-write", exc)
            return False
        finally:
            with contextlib.suppress(StorageError, StorageRefused):
                self.delete(key)

    @property
    def conditional_writes(self) -> bool:
        """Whether this store honours conditional writes (probed once, on first use). A probe
        that met an outage or a SlowDown is not kept: read-then-write for this call, and the
        next use probes again, so a short outage never settles the answer for the process."""
        if self._conditional is None:
            try:
                self._conditional = self.honours_conditional_writes()
            except StorageError as exc:
                log.warning("conditional-write probe failed (%s); read-then-write this time", exc)
                return False
            log.info("storage honours conditional writes: %s", self._conditional)
        return self._conditional

    def exists(self, key: str) -> bool:
        def call() -> bool:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True

        return self._request("check", key, call, self._absent_codes(), False)

    def _absent_codes(self) -> frozenset[str]:
        """Answers to a read that mean "no such object". Once the canary passed, a 403 too: on
        AWS, reading a missing key without s3:ListBucket answers 403, not 404."""
        return _MISSING_CODES | {"403", "AccessDenied"} if self.verified else _MISSING_CODES

    def delete(self, key: str) -> None:
        self._request("delete", key, lambda: self.client.delete_object(Bucket=self.bucket,
                                                                       Key=key))  # fmt: skip

    def list_keys(self, prefix: str) -> list[str]:
        def call() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        return self._request("listing", prefix, call)

    @property
    def signer(self) -> Any:
        """The client that presigns: self.client, or with FLEET_S3_PUBLIC_ENDPOINT_URL a second
        one for that endpoint, made on first use. SigV4 signs the Host header, so a URL must be
        signed for the host the client will send it to: editing the host of a URL signed for
        the private endpoint breaks its signature. Presigning is local (no request)."""
        if self.public_endpoint_url is None:
            return self.client
        with self._signer_lock:
            if self._signer is None:
                self._signer = self._make_signer()
            return self._signer

    def presign_get(self, key: str, expires_s: int | None = None) -> str:
        return str(
            self.signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=expires_s or self.presign_expiry_s,
            )
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def refusal_of(exc: ClientError) -> str | None:
    """What to fix, when a client error is a refusal (by its code, or by its HTTP status: a
    HEAD answer has no body, so a wrong secret is a bare 403 and a missing bucket a 404)."""
    code = _code(exc)
    if code in _REFUSALS:
        return _REFUSALS[code]
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return _REFUSALS.get(status)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _answered_unsupported(exc: StorageError) -> bool:
    """The store answered the conditional write with a 4xx (not 429) or 501: it does not take
    the condition. Any other failure (away, 5xx, SlowDown) says nothing about conditions."""
    cause = exc.__cause__
    if not isinstance(cause, ClientError) or _code(cause) in {"SlowDown", "Throttling"}:
        return False
    status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status == 501 or (400 <= status < 500 and status != 429)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
