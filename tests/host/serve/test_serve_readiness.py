"""`serve` is ready only when it can work: /readyz fails while storage cannot be written or
while the gateway would refuse the E2B URL, and a configuration that can never provision
does not start (issue 26, point 6: against a loopback E2B without
--allow-private-network, /readyz answered 200 and every provision failed)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from host.cli.main import main
from host.serve import InvocationPool, ServeState, create_app
from host.serve.readiness import E2BAddressCheck, probe_storage_write
from host.storage.memory import MemoryBackend
from provisioner.ports import StorageError
from tests.host.serve.test_serve_app import FakeComponent


class ReadOnlyStorage(MemoryBackend):
    def compare_and_swap(self, *args: object, **kwargs: object) -> int:
        raise StorageError("attempt to write a readonly database")


def ready(storage: MemoryBackend, e2b: E2BAddressCheck) -> tuple[int, dict[str, str]]:
    state = ServeState(
        token="t",
        pool=InvocationPool(1),
        invoke=FakeComponent(),
        e2b_url=e2b.url,
        storage_probe=lambda: probe_storage_write(storage),
        e2b_refusal=e2b.refusal,
        log=lambda line: None,
    )
    answer = TestClient(create_app(state)).get("/readyz")
    return answer.status_code, answer.json()


def test_readyz_fails_while_storage_takes_no_write() -> None:
    mock = E2BAddressCheck("http://127.0.0.1:3000", allow_private_network=True)
    assert ready(MemoryBackend(), mock)[0] == 200
    status, body = ready(ReadOnlyStorage(), mock)
    assert status == 503 and "readonly" in body["storage"]


def test_readyz_fails_while_the_gateway_would_refuse_the_e2b_url() -> None:
    status, body = ready(MemoryBackend(), E2BAddressCheck("http://127.0.0.1:3000", False))
    assert status == 503 and "--allow-private-network" in body["e2b"]


def test_serve_refuses_to_start_on_a_url_it_could_never_reach(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SANDBOX_PROVISIONER_TOKEN", "t")
    code = main(["serve", "--e2b-url", "http://127.0.0.1:3000", "--storage", "memory://"])
    err = capsys.readouterr().err
    assert code == 2
    assert "http://127.0.0.1:3000" in err and "--allow-private-network" in err
