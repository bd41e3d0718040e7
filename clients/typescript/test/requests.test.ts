/**
 * The compatibility rules, checked on encoded bytes (no daemon), and the
 * other pure pieces: argument checks, targets, errors, exec collection.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BranchSandboxRequestSchema,
  ForkdError,
  ProtoBranchMode,
  SnapshotStatus,
  SpawnSandboxesRequestSchema,
  branchSandboxRequest,
  createSnapshotRequest,
  deleteSnapshotRequest,
  execRequest,
  isBranchMode,
  listSandboxesRequest,
  listSnapshotsRequest,
  SetSandboxTtlRequestSchema,
  setSandboxTtlRequest,
  spawnSandboxesRequest,
  toBranchMode,
  toSnapshotStatusName,
} from "../src/index.js";
import { toForkdError } from "../src/errors.js";
import { type ExecEvent, collectExec } from "../src/exec.js";
import { targetToBaseUrl } from "../src/transport.js";
import { type FieldValue, wireFields } from "./helpers/wire.js";

// Field numbers from proto/forkd/v1/sandbox.proto.
const BRANCH = { sandboxId: 1, tag: 2, mode: 3, wait: 4, diff: 5, measureDiff: 6 } as const;
const SPAWN = {
  snapshotTag: 1,
  n: 2,
  liveFork: 3,
  memoryMib: 4,
  labels: 6,
  waitForSnapshot: 7,
  ttlSeconds: 9,
  hugePages: 10,
};

function branchFields(...args: Parameters<typeof branchSandboxRequest>): Map<number, FieldValue[]> {
  return wireFields(toBinary(BranchSandboxRequestSchema, branchSandboxRequest(...args)));
}

function spawnFields(...args: Parameters<typeof spawnSandboxesRequest>): Map<number, FieldValue[]> {
  return wireFields(toBinary(SpawnSandboxesRequestSchema, spawnSandboxesRequest(...args)));
}

describe("branchSandboxRequest", () => {
  test("mode live is sent as field 3 = BRANCH_MODE_LIVE (3)", () => {
    const f = branchFields("sb-1", { mode: "live" });
    assert.deepEqual(f.get(BRANCH.mode), [3n]);
    assert.equal(f.has(BRANCH.diff), false);
  });

  test("each mode maps to its enum number", () => {
    for (const [mode, n] of [["full", 1n], ["diff", 2n], ["live", 3n]] as const) {
      assert.deepEqual(branchFields("sb-1", { mode }).get(BRANCH.mode), [n], mode);
    }
  });

  test("wait=false puts field 4 on the wire with value false", () => {
    const f = branchFields("sb-1", { mode: "live", wait: false });
    assert.deepEqual(f.get(BRANCH.wait), [0n]);
    const decoded = fromBinary(
      BranchSandboxRequestSchema,
      toBinary(BranchSandboxRequestSchema, branchSandboxRequest("sb-1", { mode: "live", wait: false })),
    );
    assert.equal(decoded.wait, false);
  });

  test("wait=true and the default leave field 4 off the wire", () => {
    assert.equal(branchFields("sb-1", { mode: "live", wait: true }).has(BRANCH.wait), false);
    assert.equal(branchFields("sb-1", { mode: "live" }).has(BRANCH.wait), false);
    assert.equal(branchFields("sb-1").has(BRANCH.wait), false);
    assert.equal(branchSandboxRequest("sb-1", { wait: true }).wait, undefined);
  });

  test("mode wins over the legacy diff flag: only mode is sent", () => {
    for (const mode of ["full", "diff", "live"] as const) {
      const f = branchFields("sb-1", { mode, diff: true });
      assert.equal(f.has(BRANCH.diff), false, mode);
      assert.equal(f.get(BRANCH.mode)?.length, 1, mode);
    }
  });

  test("diff=true alone is sent as the legacy field 5, with no mode", () => {
    const f = branchFields("sb-1", { diff: true });
    assert.deepEqual(f.get(BRANCH.diff), [1n]);
    assert.equal(f.has(BRANCH.mode), false);
  });

  test("defaults send only the sandbox id", () => {
    const f = branchFields("sb-1");
    assert.deepEqual([...f.keys()], [BRANCH.sandboxId]);
    assert.deepEqual(f.get(BRANCH.sandboxId), [new TextEncoder().encode("sb-1")]);
  });

  test("tag and measureDiff are sent when given", () => {
    const f = branchFields("sb-1", { tag: "t1", measureDiff: true });
    assert.deepEqual(f.get(BRANCH.tag), [new TextEncoder().encode("t1")]);
    assert.deepEqual(f.get(BRANCH.measureDiff), [1n]);
  });

  test("a mode outside BranchMode is a RangeError", () => {
    const bad = { mode: "LIVE" } as unknown as { mode: "live" };
    assert.throws(() => branchSandboxRequest("sb-1", bad), {
      name: "RangeError",
      message: /mode must be one of "full", "diff", "live"; got "LIVE"/,
    });
  });

  test("a non-boolean wait is a TypeError, not a truthy true", () => {
    const bad = { mode: "live", wait: "false" } as unknown as { wait: boolean };
    assert.throws(() => branchSandboxRequest("sb-1", bad), { name: "TypeError", message: /wait/ });
  });
});

describe("spawnSandboxesRequest", () => {
  test("liveFork=true is sent as live_fork (field 3) = true", () => {
    const f = spawnFields({ liveFork: true });
    assert.deepEqual(f.get(SPAWN.liveFork), [1n]);
    assert.equal(spawnSandboxesRequest({ liveFork: true }).liveFork, true);
  });

  test("liveFork=false and the default leave field 3 off the wire", () => {
    assert.equal(spawnFields({ liveFork: false }).has(SPAWN.liveFork), false);
    assert.equal(spawnFields().has(SPAWN.liveFork), false);
    assert.equal(spawnSandboxesRequest({ liveFork: false }).liveFork, undefined);
  });

  test("n defaults to 1; an absent tag is a cold boot (no field 1)", () => {
    const f = spawnFields();
    assert.deepEqual(f.get(SPAWN.n), [1n]);
    assert.equal(f.has(SPAWN.snapshotTag), false);
  });

  test("tag, n, memoryMib, labels and waitForSnapshot are sent", () => {
    const req = spawnSandboxesRequest({
      tag: "warm",
      n: 3,
      memoryMib: 64,
      labels: { team: "a", env: "b" },
      waitForSnapshot: true,
    });
    assert.equal(req.snapshotTag, "warm");
    assert.equal(req.n, 3);
    assert.equal(req.memoryMib, 64);
    assert.deepEqual(req.labels, { team: "a", env: "b" });
    const f = wireFields(toBinary(SpawnSandboxesRequestSchema, req));
    assert.deepEqual(f.get(SPAWN.memoryMib), [64n]);
    assert.equal(f.get(SPAWN.labels)?.length, 2);
    assert.deepEqual(f.get(SPAWN.waitForSnapshot), [1n]);
  });

  test("n=0 is passed through for the server to judge", () => {
    assert.equal(spawnSandboxesRequest({ n: 0 }).n, 0);
  });

  test("hugePages is field 10, off the wire unless true", () => {
    assert.deepEqual(spawnFields({ hugePages: true }).get(SPAWN.hugePages), [1n]);
    assert.equal(spawnFields().has(SPAWN.hugePages), false);
    assert.equal(spawnFields({ hugePages: false }).has(SPAWN.hugePages), false);
  });

  test("ttlSeconds is field 9, off the wire when absent or 0", () => {
    assert.deepEqual(spawnFields({ ttlSeconds: 30 }).get(SPAWN.ttlSeconds), [30n]);
    assert.deepEqual(spawnFields({ ttlSeconds: 7n }).get(SPAWN.ttlSeconds), [7n]);
    assert.equal(spawnFields().has(SPAWN.ttlSeconds), false);
    assert.equal(spawnFields({ ttlSeconds: 0 }).has(SPAWN.ttlSeconds), false);
    assert.throws(() => spawnSandboxesRequest({ ttlSeconds: -1 }), RangeError);
    assert.throws(() => spawnSandboxesRequest({ ttlSeconds: 1.5 }), RangeError);
    assert.throws(() => spawnSandboxesRequest({ ttlSeconds: 1n << 64n }), RangeError);
  });

  test("values that cannot be encoded are rejected before sending", () => {
    assert.throws(() => spawnSandboxesRequest({ n: -1 }), RangeError);
    assert.throws(() => spawnSandboxesRequest({ n: 1.5 }), RangeError);
    assert.throws(() => spawnSandboxesRequest({ memoryMib: 2 ** 32 }), RangeError);
    const bad = { labels: { team: 1 } } as unknown as { labels: Record<string, string> };
    assert.throws(() => spawnSandboxesRequest(bad), { name: "TypeError", message: /labels\.team/ });
  });
});

describe("other request builders", () => {
  test("execRequest carries id, argv and timeout", () => {
    const req = execRequest("sb-1", ["echo", "a b"], { timeoutMs: 250 });
    assert.equal(req.sandboxId, "sb-1");
    assert.deepEqual(req.argv, ["echo", "a b"]);
    assert.equal(req.timeoutMs, 250);
    assert.throws(() => execRequest("sb-1", "echo" as unknown as string[]), TypeError);
  });

  test("setSandboxTtlRequest carries the id and ttl; 0 (clear) is off the wire", () => {
    const f = wireFields(toBinary(SetSandboxTtlRequestSchema, setSandboxTtlRequest("sb-1", 120)));
    assert.deepEqual(f.get(2), [120n]);
    const cleared = wireFields(toBinary(SetSandboxTtlRequestSchema, setSandboxTtlRequest("sb-1", 0)));
    assert.equal(cleared.has(2), false);
    assert.equal(setSandboxTtlRequest("sb-1", 5n).ttlSeconds, 5n);
    assert.throws(() => setSandboxTtlRequest("sb-1", -5), RangeError);
    assert.throws(() => setSandboxTtlRequest("sb-1", "5" as unknown as number), RangeError);
  });

  test("deleteSnapshotRequest carries cascade and force", () => {
    const req = deleteSnapshotRequest("t", { cascade: true });
    assert.equal(req.tag, "t");
    assert.equal(req.cascade, true);
    assert.equal(req.force, false);
  });

  test("createSnapshotRequest accepts warm-up argvs and commands", () => {
    const req = createSnapshotRequest({
      tag: "warm",
      warmup: [["fill", "8", "1"], { argv: ["checksum"], timeoutMs: 500 }],
      keepRunning: true,
    });
    assert.deepEqual(
      req.warmup.map((w) => [w.argv, w.timeoutMs]),
      [[["fill", "8", "1"], 0], [["checksum"], 500]],
    );
    assert.equal(req.keepRunning, true);
  });

  test("list requests take labels and a status name or enum", () => {
    assert.deepEqual(listSandboxesRequest({ labels: { team: "a" } }).labelSelector, { team: "a" });
    assert.equal(listSnapshotsRequest().status, SnapshotStatus.UNSPECIFIED);
    assert.equal(listSnapshotsRequest({ status: "writing" }).status, SnapshotStatus.WRITING);
    assert.equal(listSnapshotsRequest({ status: SnapshotStatus.FAILED }).status, SnapshotStatus.FAILED);
    const bad = { status: "READY" } as unknown as { status: "ready" };
    assert.throws(() => listSnapshotsRequest(bad), RangeError);
  });
});

describe("enum names", () => {
  test("BranchMode converts from the proto enum and checks strings", () => {
    assert.equal(toBranchMode(ProtoBranchMode.LIVE), "live");
    assert.equal(toBranchMode(ProtoBranchMode.UNSPECIFIED), undefined);
    assert.equal(isBranchMode("diff"), true);
    assert.equal(isBranchMode("toString"), false);
  });

  test("snapshot statuses have names", () => {
    assert.equal(toSnapshotStatusName(SnapshotStatus.READY), "ready");
    assert.equal(toSnapshotStatusName(SnapshotStatus.UNSPECIFIED), undefined);
  });
});

describe("targetToBaseUrl", () => {
  test("host:port becomes an http:// URL; URLs are kept", () => {
    assert.equal(targetToBaseUrl("127.0.0.1:50051"), "http://127.0.0.1:50051");
    assert.equal(targetToBaseUrl("[::1]:7000"), "http://[::1]:7000");
    assert.equal(targetToBaseUrl("http://forkd.local:80/"), "http://forkd.local:80");
    assert.equal(targetToBaseUrl("https://forkd.example"), "https://forkd.example");
  });

  test("other schemes and empty targets are TypeErrors", () => {
    assert.throws(() => targetToBaseUrl(""), TypeError);
    assert.throws(() => targetToBaseUrl("unix:///run/forkd.sock"), TypeError);
    // Without "//" this would otherwise parse as host "unix".
    assert.throws(() => targetToBaseUrl("unix:/run/forkd.sock"), /Unix sockets are not supported/);
  });
});

describe("ForkdError", () => {
  test("carries the code, its gRPC name and the server's message", () => {
    const err = toForkdError(new ConnectError("sandbox sb-x not found", Code.NotFound));
    assert.ok(err instanceof ForkdError);
    assert.equal(err.code, Code.NotFound);
    assert.equal(err.codeName, "NOT_FOUND");
    assert.equal(err.rawMessage, "sandbox sb-x not found");
    assert.equal(err.message, "NOT_FOUND: sandbox sb-x not found");
  });

  test("uses gRPC spellings and wraps foreign errors as UNKNOWN", () => {
    assert.equal(toForkdError(new ConnectError("x", Code.Canceled)).codeName, "CANCELLED");
    assert.equal(toForkdError(new ConnectError("x", Code.InvalidArgument)).codeName, "INVALID_ARGUMENT");
    const foreign = toForkdError(new Error("boom"));
    assert.equal(foreign.codeName, "UNKNOWN");
    assert.equal(foreign.rawMessage, "boom");
  });
});

describe("collectExec", () => {
  async function* events(list: ExecEvent[]): AsyncGenerator<ExecEvent> {
    yield* list;
  }
  const bytes = (s: string): Uint8Array => new TextEncoder().encode(s);

  test("joins the chunks and takes the exit status", async () => {
    const result = await collectExec(
      events([
        { kind: "stdout", data: bytes("he") },
        { kind: "stderr", data: bytes("warn") },
        { kind: "stdout", data: bytes("llo") },
        { kind: "exit", exitCode: 2, durationUs: 41n },
      ]),
    );
    assert.equal(result.stdoutText, "hello");
    assert.equal(result.stderrText, "warn");
    assert.equal(result.exitCode, 2);
    assert.equal(result.ok, false);
    assert.equal(result.durationUs, 41n);
  });

  test("a stream without an exit is an INTERNAL error", async () => {
    await assert.rejects(collectExec(events([{ kind: "stdout", data: bytes("x") }])), {
      code: Code.Internal,
    });
  });
});
