"""One rooted exception hierarchy; each error carries its HTTP status and a stable code."""

from __future__ import annotations

from typing import Any

from service.domain.states import FailureReason


class StackMLError(Exception):
    """Root of every error stackml raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequest(StackMLError):
    """The request is malformed (bad JSON, wrong content type, bad query parameter)."""

    status = 400
    code = "invalid_request"


class ValidationFailed(StackMLError):
    """The request is well formed but a field is semantically wrong."""

    status = 422
    code = "validation_failed"


class NotFound(StackMLError):
    status = 404
    code = "not_found"


class Conflict(StackMLError):
    """The resource is in a state that does not allow the operation."""

    status = 409
    code = "conflict"


class PayloadTooLarge(StackMLError):
    status = 413
    code = "payload_too_large"


class Unauthorized(StackMLError):
    status = 401
    code = "unauthorized"


class Forbidden(StackMLError):
    status = 403
    code = "forbidden"


class ServiceUnavailable(StackMLError):
    status = 503
    code = "service_unavailable"

    def __init__(
        self, message: str, *, retry_after: int = 5, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class StaleState(Conflict):
    """A compare-and-set transition lost the race: the job was no longer in the expected state."""

    code = "stale_state"


class BackendError(StackMLError):
    """A compute or storage backend failed; `reason` is the job failure slug it maps to."""

    code = "backend_error"
    reason: str = FailureReason.BACKEND_ERROR

    def __init__(
        self, message: str, *, reason: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        if reason:
            self.reason = reason


class TransientBackendError(BackendError):
    """A backend call failed in a way worth retrying (an API error, no answer in time)."""

    reason: str = FailureReason.BACKEND_UNAVAILABLE


class CloudError(TransientBackendError):
    """The cloud did not do what was asked (an API error or no answer); worth a retry."""

    reason: str = FailureReason.CLOUD_ERROR


class ServerNotFound(BackendError):
    reason: str = FailureReason.SERVER_LOST


class AllocationFailed(BackendError):
    reason: str = FailureReason.ALLOCATION_FAILED


class NoValidHost(AllocationFailed):
    """The scheduler found no host for the flavor (Nova: ERROR with a "No valid host" fault)."""

    reason: str = FailureReason.NO_VALID_HOST


class QuotaExceeded(BackendError):
    """The cloud refused for quota (Nova 403): the job waits in QUEUED and retries later."""

    reason: str = FailureReason.QUOTA_EXCEEDED


class DeadlineExceeded(BackendError):
    """A bounded wait ran out of time."""

    reason: str = FailureReason.TIMEOUT


class StoreError(BackendError):
    reason: str = FailureReason.STORE_ERROR


class GrantDenied(StoreError):
    """A grant signature is wrong, expired, or used outside its prefix or access."""

    status = 403
    code = "grant_denied"
