"""Listeners and token authentication."""

from __future__ import annotations

import secrets

import pytest

SANDBOX_METHODS = "forkd.v1.SandboxService/ListSandboxes"


@pytest.mark.parametrize("token_via", ["file", "env"])
def test_token_auth_on_public_listener(daemon_factory, token_via):
    token = secrets.token_hex(16)
    d = daemon_factory(host="0.0.0.0", token=token, token_via=token_via)
    anon, right = d.anon, d.client
    wrong = d.client.with_options(token="not-" + token)

    # Health is exempt from auth.
    assert anon.health() == "SERVING"
    assert wrong.health() == "SERVING"

    # Missing or wrong token: UNAUTHENTICATED, unary and streaming alike.
    for client in (anon, wrong):
        res = client.expect_error("UNAUTHENTICATED", SANDBOX_METHODS, {})
        assert res.messages == []
        client.expect_error("UNAUTHENTICATED", "forkd.v1.SandboxService/SpawnSandboxes", {"n": 1})
        client.expect_error(
            "UNAUTHENTICATED",
            "forkd.v1.SandboxService/Exec",
            {"sandboxId": "sb-0000000000", "argv": ["echo"]},
        )
        client.expect_error("UNAUTHENTICATED", "forkd.v1.SnapshotService/ListSnapshots", {})
    # The scheme is part of the header: the bare token is not enough.
    res = anon.run([SANDBOX_METHODS], {}, extra=["-H", f"authorization: {token}"])
    assert res.code == "UNAUTHENTICATED", res.describe()
    assert d.list() == [], "a refused spawn must start nothing"

    # The right token works, for calls, streams and reflection.
    [sb] = d.spawn(1)
    r = right.exec(sb["id"], ["echo", "authorized"])
    assert (r.stdout, r.exit_code) == (b"authorized\n", 0)
    assert [s["id"] for s in d.list()] == [sb["id"]]
    assert "forkd.v1.SandboxService" in right.list_services()


def test_public_listener_without_token_refused(daemon_factory):
    d = daemon_factory(host="0.0.0.0", wait=False)
    d.expect_clean_exit = False
    rc = d.wait(30)
    log = d.log_tail()
    assert rc is not None, f"forkd on 0.0.0.0 without a token is still running:\n{log}"
    assert rc != 0, f"forkd on 0.0.0.0 without a token exited 0:\n{log}"
    assert "token" in log.lower(), f"the refusal does not say a token is needed:\n{log}"
    assert d.leftover_vmms() == []


def test_unix_socket_listener(daemon_factory, short_tmp):
    """The Unix listener serves the whole API. Clients must send an
    :authority such as `localhost`: grpcurl 1.8 sends the socket path, which
    the h2 crate under tonic rejects as malformed before forkd sees the call
    (hyperium/h2#487), so `-authority localhost` is the documented form."""
    sock = short_tmp / "forkd.sock"
    d = daemon_factory(listen_unix=sock)
    assert sock.is_socket(), f"{sock} is not a socket"
    ux = d.client.with_options(target=str(sock), unix=True, authority="localhost")

    assert ux.health() == "SERVING"
    services = ux.list_services()
    assert "forkd.v1.SandboxService" in services, services

    resp = ux.call("forkd.v1.SandboxService/SpawnSandboxes", {"n": 1, "labels": {"via": "unix"}})
    [sb] = resp["sandboxes"]
    d.record_sandboxes([sb])
    r = ux.exec(sb["id"], ["echo", "over", "unix"])
    assert (r.stdout, r.exit_code) == (b"over unix\n", 0)
    # Same daemon behind both listeners.
    assert [s["id"] for s in d.list({"via": "unix"})] == [sb["id"]]
    got = ux.call("forkd.v1.SandboxService/GetSandbox", {"id": sb["id"]})["sandbox"]
    assert got["state"] == "SANDBOX_STATE_RUNNING"
