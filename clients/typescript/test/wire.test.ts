/**
 * The compatibility rules on the real wire: the Controller talks to a real
 * daemon through a recording proxy, and each test checks both the bytes the
 * client sent and that the daemon read them as intended.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  BranchSandboxRequestSchema,
  Controller,
  ProtoBranchMode,
  SandboxService,
  SnapshotStatus,
  SpawnSandboxesRequestSchema,
  toBranchMode,
} from "../src/index.js";
import { createOwnedTransport } from "../src/transport.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";
import { type FieldValue, type WireProxy, startWireProxy, wireFields } from "./helpers/wire.js";

const BRANCH_MODE = 3;
const BRANCH_WAIT = 4;
const BRANCH_DIFF = 5;
const SPAWN_LIVE_FORK = 3;

let daemon: Daemon;
let proxy: WireProxy;
let forkd: Controller;
let source: string;

before(async () => {
  daemon = await startDaemon();
  proxy = await startWireProxy(daemon.target);
  forkd = new Controller({ target: proxy.target });
});
after(async () => {
  forkd?.close();
  await proxy?.close();
  await daemon?.stop();
});

/** The fields of the one request message of the most recent call. */
function lastRequest(): { bytes: Uint8Array; fields: Map<number, FieldValue[]> } {
  const call = proxy.calls().at(-1) ?? assert.fail("no call captured");
  assert.equal(call.messages.length, 1, "a unary call sends one message");
  const bytes = call.messages[0] ?? assert.fail("no message");
  return { bytes, fields: wireFields(bytes) };
}

test("liveFork=true is sent as live_fork=true and recorded on the sandbox", async () => {
  const res = await forkd.spawnSandboxes({ memoryMib: 64, liveFork: true });
  const { bytes, fields } = lastRequest();
  assert.deepEqual(fields.get(SPAWN_LIVE_FORK), [1n]);
  assert.equal(fromBinary(SpawnSandboxesRequestSchema, bytes).liveFork, true);
  const sb = res.sandboxes[0] ?? assert.fail("no sandbox");
  assert.equal(sb.liveFork, true);
  assert.equal((await forkd.getSandbox(sb.id)).liveFork, true);
  await forkd.deleteSandbox(sb.id);
});

test("liveFork=false is not on the wire", async () => {
  const res = await forkd.spawnSandboxes({ memoryMib: 64, liveFork: false });
  const { fields } = lastRequest();
  assert.equal(fields.has(SPAWN_LIVE_FORK), false);
  source = res.sandboxes[0]?.id ?? assert.fail("no sandbox");
  assert.equal(res.sandboxes[0]?.liveFork, false);
});

test("wait=true is not on the wire, and the daemon waits", async () => {
  const res = await forkd.branchSandbox(source, { tag: "w-live", mode: "live", wait: true });
  const { fields } = lastRequest();
  assert.equal(fields.has(BRANCH_WAIT), false);
  assert.deepEqual(fields.get(BRANCH_MODE), [3n]);
  assert.equal(res.snapshot?.status, SnapshotStatus.READY);
  assert.equal(toBranchMode(res.snapshot?.mode ?? 0), "live");
});

test("mode=live with wait=false sends wait=false; the daemon returns WRITING", async () => {
  const res = await forkd.branchSandbox(source, { tag: "w-async", mode: "live", wait: false });
  const { bytes, fields } = lastRequest();
  assert.deepEqual(fields.get(BRANCH_MODE), [3n]);
  assert.deepEqual(fields.get(BRANCH_WAIT), [0n]);
  assert.equal(fromBinary(BranchSandboxRequestSchema, bytes).wait, false);
  assert.equal(res.snapshot?.status, SnapshotStatus.WRITING);
  const updates: SnapshotStatus[] = [];
  for await (const u of forkd.watchSnapshot("w-async")) {
    updates.push(u.status);
  }
  assert.equal(updates.at(-1), SnapshotStatus.READY);
});

test("mode wins over diff: only mode is sent (diff with LIVE would be INVALID_ARGUMENT)", async () => {
  const res = await forkd.branchSandbox(source, { tag: "w-both", mode: "live", diff: true });
  const { fields } = lastRequest();
  assert.deepEqual(fields.get(BRANCH_MODE), [3n]);
  assert.equal(fields.has(BRANCH_DIFF), false);
  assert.equal(toBranchMode(res.snapshot?.mode ?? 0), "live");
});

test("why: the daemon rejects diff=true next to mode LIVE when a raw client sends both", async () => {
  const { transport, session } = createOwnedTransport(`http://${daemon.target}`, []);
  try {
    const raw = createClient(SandboxService, transport);
    const err = await raw
      .branchSandbox({ sandboxId: source, mode: ProtoBranchMode.LIVE, diff: true })
      .then(() => assert.fail("the daemon accepted a contradiction"), (e: unknown) => e);
    assert.ok(err instanceof ConnectError);
    assert.equal(err.code, Code.InvalidArgument);
    assert.match(err.rawMessage, /contradicts/);
  } finally {
    session.abort();
  }
});

test("diff=true alone is sent as the legacy flag; the daemon branches DIFF", async () => {
  const res = await forkd.branchSandbox(source, { tag: "w-legacy", diff: true });
  const { fields } = lastRequest();
  assert.deepEqual(fields.get(BRANCH_DIFF), [1n]);
  assert.equal(fields.has(BRANCH_MODE), false);
  assert.equal(fields.has(BRANCH_WAIT), false);
  assert.equal(toBranchMode(res.snapshot?.mode ?? 0), "diff");
  assert.equal(res.snapshot?.parentTag, "w-both");
});

test("every call made went over the proxy, one stream each", () => {
  // 2 spawns, getSandbox, deleteSandbox, 4 branches, 1 watch.
  assert.equal(proxy.calls().length, 9);
});
