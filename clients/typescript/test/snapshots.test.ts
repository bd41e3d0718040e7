/**
 * Branching (FULL, DIFF, LIVE), watching a LIVE copy, forking children and
 * the snapshot store against a real daemon. The daemon's background copy is
 * rate-limited so that a LIVE wait=false snapshot stays WRITING long enough
 * to observe.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  type Controller,
  ProtoBranchMode,
  SnapshotStatus,
  type WatchSnapshotResponse,
  toBranchMode,
} from "../src/index.js";
import { rejectsWith } from "./helpers/assert.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";

const MIB = 64;
const FILL_MIB = 16;
const COPY_RATE_MIBPS = 64;

let daemon: Daemon;
let forkd: Controller;
/** Sandboxes to delete after the file, whatever the tests did. */
const cleanup: string[] = [];

before(async () => {
  daemon = await startDaemon({ args: ["--live-copy-rate-mibps", String(COPY_RATE_MIBPS)] });
  forkd = daemon.client;
});
after(async () => {
  for (const id of cleanup) {
    await forkd.deleteSandbox(id).catch(() => undefined);
  }
  await daemon?.stop();
});

async function spawnOne(tag?: string): Promise<string> {
  const res = await forkd.spawnSandboxes(tag === undefined ? { memoryMib: MIB } : { tag });
  const id = res.sandboxes[0]?.id ?? assert.fail(`spawn failed: ${JSON.stringify(res.failures)}`);
  cleanup.push(id);
  return id;
}

async function checksum(id: string): Promise<string> {
  const res = await forkd.exec(id, ["checksum", String(FILL_MIB)]);
  assert.equal(res.exitCode, 0, res.stderrText);
  return res.stdoutText.trim();
}

async function watchAll(tag: string): Promise<WatchSnapshotResponse[]> {
  const updates: WatchSnapshotResponse[] = [];
  for await (const u of forkd.watchSnapshot(tag)) {
    updates.push(u);
  }
  return updates;
}

function statusName(status: SnapshotStatus): string {
  return SnapshotStatus[status] ?? String(status);
}

describe("branch", () => {
  let source: string;
  let warmSum: string;
  const FULL_BYTES_MAX = BigInt(MIB) * 1024n * 1024n;
  const FILL_BYTES = BigInt(FILL_MIB) * 1024n * 1024n;

  before(async () => {
    source = await spawnOne();
    assert.equal((await forkd.exec(source, ["fill", String(FILL_MIB), "7"])).exitCode, 0);
    warmSum = await checksum(source);
  });

  test("FULL writes the touched memory and is READY", async () => {
    const res = await forkd.branchSandbox(source, { tag: "t-full", mode: "full" });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(snap.tag, "t-full");
    assert.equal(statusName(snap.status), "READY");
    assert.equal(toBranchMode(snap.mode), "full");
    assert.equal(snap.parentTag, "");
    assert.equal(snap.sourceSandboxId, source);
    assert.deepEqual(snap.chain, ["t-full"]);
    assert.equal(snap.memoryMib, MIB);
    assert.ok(res.pauseMs > 0, `pauseMs ${res.pauseMs}`);
    assert.ok(res.bytesWritten >= FILL_BYTES, `bytesWritten ${res.bytesWritten}`);
    assert.ok(res.bytesWritten <= FULL_BYTES_MAX, `bytesWritten ${res.bytesWritten}`);
    assert.equal(snap.memoryBytes, res.bytesWritten);
  });

  test("DIFF writes only the dirtied pages against its base", async () => {
    assert.equal((await forkd.exec(source, ["fill", "1", "9"])).exitCode, 0);
    const res = await forkd.branchSandbox(source, { tag: "t-diff", mode: "diff" });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(statusName(snap.status), "READY");
    assert.equal(snap.mode, ProtoBranchMode.DIFF);
    assert.equal(snap.parentTag, "t-full");
    assert.deepEqual(snap.chain, ["t-diff", "t-full"]);
    assert.ok(res.dirtyPages >= 256n, `dirtyPages ${res.dirtyPages}`);
    assert.ok(res.bytesWritten >= 1024n * 1024n, `bytesWritten ${res.bytesWritten}`);
    assert.ok(res.bytesWritten < FILL_BYTES, `bytesWritten ${res.bytesWritten}`);
    assert.deepEqual((await forkd.getSnapshot("t-full")).dependents, ["t-diff"]);
    // Restore the pattern the later checks expect.
    assert.equal((await forkd.exec(source, ["fill", String(FILL_MIB), "7"])).exitCode, 0);
    assert.equal(await checksum(source), warmSum);
  });

  test("the legacy diff flag alone branches DIFF", async () => {
    const res = await forkd.branchSandbox(source, { tag: "t-legacy", diff: true });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(toBranchMode(snap.mode), "diff");
    assert.equal(snap.parentTag, "t-diff");
  });

  test("LIVE with wait=true returns READY", async () => {
    const res = await forkd.branchSandbox(source, { tag: "t-live", mode: "live" });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(statusName(snap.status), "READY");
    assert.equal(toBranchMode(snap.mode), "live");
    assert.ok(res.pauseMs > 0 && res.pauseMs < 1000, `pauseMs ${res.pauseMs}`);
    assert.ok(res.bytesWritten >= FILL_BYTES, `bytesWritten ${res.bytesWritten}`);
  });

  test("LIVE wait=false is WRITING; watchSnapshot follows it to READY", async () => {
    const res = await forkd.branchSandbox(source, { tag: "t-async", mode: "live", wait: false });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(statusName(snap.status), "WRITING");
    assert.ok(res.pauseMs > 0, `pauseMs ${res.pauseMs}`);

    // Not forkable until READY, unless the spawn asks to wait.
    const err = await rejectsWith(forkd.spawnSandboxes({ tag: "t-async" }), "FAILED_PRECONDITION");
    assert.match(err.rawMessage, /WRITING/);

    const updates = await watchAll("t-async");
    assert.ok(updates.length >= 2, `only ${updates.length} update(s)`);
    assert.equal(statusName(updates[0]?.status ?? SnapshotStatus.UNSPECIFIED), "WRITING");
    const last = updates.at(-1) ?? assert.fail("no updates");
    assert.equal(statusName(last.status), "READY");
    assert.equal(last.failureReason, "");
    assert.ok(last.bytesTotal > 0n);
    assert.equal(last.bytesCopied, last.bytesTotal);
    for (const u of updates) {
      assert.equal(u.tag, "t-async");
    }
    for (let i = 1; i < updates.length; i++) {
      assert.ok((updates[i]?.bytesCopied ?? 0n) >= (updates[i - 1]?.bytesCopied ?? 0n));
    }
    assert.equal(statusName((await forkd.getSnapshot("t-async")).status), "READY");
  });

  test("a child of the LIVE snapshot has the source's memory", async () => {
    const child = await spawnOne("t-async");
    const sb = await forkd.getSandbox(child);
    assert.equal(sb.snapshotTag, "t-async");
    assert.equal(await checksum(child), warmSum);
    assert.deepEqual((await forkd.getSnapshot("t-async")).children, [child]);
  });

  test("waitForSnapshot spawns from a WRITING snapshot once it is READY", async () => {
    await forkd.branchSandbox(source, { tag: "t-async2", mode: "live", wait: false });
    const res = await forkd.spawnSandboxes({ tag: "t-async2", waitForSnapshot: true });
    const child = res.sandboxes[0] ?? assert.fail("no child");
    cleanup.push(child.id);
    assert.equal(statusName((await forkd.getSnapshot("t-async2")).status), "READY");
    assert.equal(await checksum(child.id), warmSum);
  });

  test("deleting a WRITING snapshot ends its watch with FAILED", async () => {
    await forkd.branchSandbox(source, { tag: "t-cancel", mode: "live", wait: false });
    const updates: WatchSnapshotResponse[] = [];
    for await (const u of forkd.watchSnapshot("t-cancel")) {
      updates.push(u);
      if (updates.length === 1) {
        assert.equal(statusName(u.status), "WRITING");
        assert.deepEqual(await forkd.deleteSnapshot("t-cancel"), ["t-cancel"]);
      }
    }
    const last = updates.at(-1) ?? assert.fail("no updates");
    assert.equal(statusName(last.status), "FAILED");
    assert.notEqual(last.failureReason, "");
    await rejectsWith(forkd.getSnapshot("t-cancel"), "NOT_FOUND");
    assert.equal((await forkd.exec(source, ["echo", "ok"])).stdoutText, "ok\n");
  });

  test("watching a READY snapshot yields its status once and ends", async () => {
    const updates = await watchAll("t-live");
    assert.equal(updates.length, 1);
    assert.equal(statusName(updates[0]?.status ?? SnapshotStatus.UNSPECIFIED), "READY");
  });

  test("bad branches map to gRPC codes", async () => {
    await rejectsWith(forkd.branchSandbox(source, { tag: "t-full" }), "ALREADY_EXISTS");
    await rejectsWith(forkd.branchSandbox(source, { tag: "bad tag!" }), "INVALID_ARGUMENT");
    await rejectsWith(forkd.branchSandbox(source, { mode: "full", wait: false }), "INVALID_ARGUMENT");
    const cold = await spawnOne();
    await rejectsWith(forkd.branchSandbox(cold, { mode: "diff" }), "FAILED_PRECONDITION");
  });
});

describe("snapshot store", () => {
  test("createSnapshot warms a sandbox; its children share the warm memory", async () => {
    const res = await forkd.createSnapshot({
      tag: "warm",
      memoryMib: MIB,
      warmup: [["fill", String(FILL_MIB), "42"]],
    });
    const snap = res.snapshot ?? assert.fail("no snapshot");
    assert.equal(snap.tag, "warm");
    assert.equal(statusName(snap.status), "READY");
    assert.equal(res.sandboxId, "");
    const spawned = await forkd.spawnSandboxes({ tag: "warm", n: 2 });
    assert.equal(spawned.sandboxes.length, 2);
    const ids = spawned.sandboxes.map((s) => s.id);
    cleanup.push(...ids);
    const sums = await Promise.all(ids.map(checksum));
    assert.equal(sums[0], sums[1]);
    assert.deepEqual((await forkd.getSnapshot("warm")).children.sort(), [...ids].sort());
  });

  test("a failing warm-up is FAILED_PRECONDITION and leaves no snapshot", async () => {
    await rejectsWith(
      forkd.createSnapshot({ tag: "never", memoryMib: MIB, warmup: [["exit", "3"]] }),
      "FAILED_PRECONDITION",
    );
    await rejectsWith(forkd.getSnapshot("never"), "NOT_FOUND");
  });

  test("list, with a status filter", async () => {
    const all = (await forkd.listSnapshots()).map((s) => s.tag);
    for (const tag of ["t-full", "t-diff", "t-live", "t-async", "warm"]) {
      assert.ok(all.includes(tag), `${tag} not in ${all.join(",")}`);
    }
    const ready = await forkd.listSnapshots({ status: "ready" });
    assert.equal(ready.length, all.length);
    assert.deepEqual(await forkd.listSnapshots({ status: SnapshotStatus.FAILED }), []);
    assert.deepEqual(await forkd.listSnapshots({ status: "writing" }), []);
  });

  test("delete refuses to orphan dependents; cascade removes the chain", async () => {
    const err = await rejectsWith(forkd.deleteSnapshot("t-full"), "FAILED_PRECONDITION");
    assert.match(err.rawMessage, /t-diff/);
    const deleted = await forkd.deleteSnapshot("t-full", { cascade: true });
    assert.equal(deleted.at(-1), "t-full");
    assert.deepEqual([...deleted].sort(), ["t-diff", "t-full", "t-legacy"]);
    for (const tag of deleted) {
      await rejectsWith(forkd.getSnapshot(tag), "NOT_FOUND");
    }
  });

  test("unknown tags are NOT_FOUND everywhere", async () => {
    await rejectsWith(forkd.getSnapshot("no-such-tag"), "NOT_FOUND");
    await rejectsWith(forkd.deleteSnapshot("no-such-tag"), "NOT_FOUND");
    await rejectsWith(forkd.spawnSandboxes({ tag: "no-such-tag" }), "NOT_FOUND");
    await rejectsWith(watchAll("no-such-tag"), "NOT_FOUND");
  });
});
