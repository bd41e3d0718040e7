"""Channel options per target: Unix sockets get the authority `localhost`
(the daemon's HTTP/2 stack rejects a socket path as :authority); TCP
targets get none. tests/e2e/test_unix_clients.py checks it against a real
daemon."""

from __future__ import annotations

from forkd.controller import channel_options


def test_unix_targets_send_localhost_as_authority() -> None:
    for target in ("unix:/run/forkd.sock", "unix:///run/forkd.sock", "unix-abstract:forkd"):
        assert channel_options(target) == [("grpc.default_authority", "localhost")], target


def test_tcp_targets_need_no_options() -> None:
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///forkd:50051"):
        assert channel_options(target) == [], target
