"""The API surface as a grpcurl user sees it: reflection, doc comments and
health. (The snapshot RPCs are exercised in test_snapshots.py.)"""

from __future__ import annotations


def test_list_shows_all_services(daemon):
    services = daemon.client.list_services()
    for name in ("forkd.v1.SandboxService", "forkd.v1.SnapshotService", "grpc.health.v1.Health"):
        assert name in services, services
    reflection = [s for s in services if s.startswith("grpc.reflection.") and s.endswith(".ServerReflection")]
    assert reflection, f"no reflection service listed: {services}"


def test_list_service_methods(daemon):
    res = daemon.client.run(["list", "forkd.v1.SandboxService"], reflection=True)
    assert res.ok, res.describe()
    methods = set(res.stdout.split())
    assert methods == {
        "forkd.v1.SandboxService.SpawnSandboxes",
        "forkd.v1.SandboxService.GetSandbox",
        "forkd.v1.SandboxService.ListSandboxes",
        "forkd.v1.SandboxService.DeleteSandbox",
        "forkd.v1.SandboxService.Exec",
        "forkd.v1.SandboxService.BranchSandbox",
        "forkd.v1.SandboxService.ReadConsole",
        "forkd.v1.SandboxService.SetSandboxTtl",
        "forkd.v1.SandboxService.WriteFile",
        "forkd.v1.SandboxService.ReadFile",
        "forkd.v1.SandboxService.StatFile",
        "forkd.v1.SandboxService.ListDir",
        "forkd.v1.SandboxService.RemoveFile",
    }, res.stdout


def test_describe_service_shows_doc_comments(daemon):
    text = daemon.client.describe("forkd.v1.SandboxService")
    assert "forkd.v1.SandboxService is a service:" in text, text
    # Comments from proto/forkd/v1/sandbox.proto.
    assert "SandboxService boots, forks, inspects, branches and deletes microVM" in text, text
    assert "In a reference-guest sandbox commands run one at a time, in arrival" in text, text
    assert "a Linux sandbox runs several commands at once." in text, text
    assert "returns ( stream .forkd.v1.ExecResponse )" in text, text
    assert "rpc WriteFile ( stream .forkd.v1.WriteFileRequest )" in text, text


def test_describe_message_shows_doc_comments(daemon):
    text = daemon.client.describe("forkd.v1.SpawnSandboxesRequest")
    assert "forkd.v1.SpawnSandboxesRequest is a message:" in text, text
    assert "How many sandboxes to start, from 1 to 1000." in text, text
    assert "uint32 n = 2;" in text, text
    assert "map<string, string> labels = 6;" in text, text
    assert "uint64 ttl_seconds = 9;" in text, text
    assert "0 means the daemon's `--default-ttl`" in text, text


def test_describe_snapshot_service(daemon):
    text = daemon.client.describe("forkd.v1.SnapshotService")
    assert "WatchSnapshot streams a snapshot's status" in text, text


def test_health_serving(daemon):
    assert daemon.anon.health() == "SERVING"
    # grpc.health.v1 through reflection and the raw call agree.
    res = daemon.anon.run(["grpc.health.v1.Health/Check"], {}, reflection=True)
    assert res.ok and res.messages == [{"status": "SERVING"}], res.describe()
