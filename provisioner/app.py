"""The guest's single entry point: never lets an exception escape."""

from __future__ import annotations

import contextlib

from provisioner.failures import FailureCode
from provisioner.gates.view import inspect
from provisioner.invocation import validate
from provisioner.model import Failure, Invocation, Outcome, ProvisionerError, failed
from provisioner.operations import dispatch
from provisioner.ports import LogLevel, Ports, StorageError, StorageInvalidKey, StorageTooLarge


def run(invocation: Invocation, ports: Ports) -> Outcome:
    try:
        request = validate(invocation)
        if request.operation == "inspect":
            return inspect(request, ports)
        return dispatch(request, ports)
    except ProvisionerError as error:
        return failed(error.failure)
    except (StorageInvalidKey, StorageTooLarge) as error:
        return failed(Failure(FailureCode.INVALID_INVOCATION, f"storage refused: {error}", False))
    except StorageError as error:
        # Fail closed: nothing was granted, the caller may try again later.
        return failed(Failure(FailureCode.STORAGE_UNAVAILABLE, f"storage failed: {error}", True))
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            ports.telemetry.log(LogLevel.ERROR, f"internal error: {message}")
        return failed(Failure(FailureCode.INTERNAL_ERROR, message, retryable=False))
