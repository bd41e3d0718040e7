/**
 * Results that read natively, against Connect's in-memory router transport
 * (no daemon): the spawn result is an array of its sandboxes that is still
 * the SpawnSandboxesResponse, and branch and create-snapshot results carry
 * the snapshot's `tag` while staying the generated messages.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { create, equals, isMessage, toBinary, toJson } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import {
  type BranchResult,
  type BranchSandboxResponse,
  BranchSandboxResponseSchema,
  Controller,
  type CreateSnapshotResponse,
  type Sandbox,
  SandboxSchema,
  SandboxService,
  SnapshotSchema,
  SnapshotService,
  SnapshotStatus,
  SpawnResult,
  type SpawnSandboxesResponse,
  SpawnSandboxesResponseSchema,
} from "../src/index.js";

const SANDBOXES = [
  create(SandboxSchema, { id: "sb-one", snapshotTag: "warm", memoryMib: 128, labels: { team: "ts" } }),
  create(SandboxSchema, { id: "sb-two", snapshotTag: "warm" }),
  create(SandboxSchema, { id: "sb-three", image: "debian-12" }),
];
const SPAWNED = create(SpawnSandboxesResponseSchema, {
  sandboxes: SANDBOXES,
  failures: [{ index: 3, code: "RESOURCE_EXHAUSTED", message: "no memory" }],
  elapsedMs: 12.5,
});
const BRANCHED = create(BranchSandboxResponseSchema, {
  snapshot: { tag: "branch-1", status: SnapshotStatus.WRITING, sourceSandboxId: "sb-one" },
  pauseMs: 0.4,
  bytesWritten: 4096n,
  dirtyPages: 7n,
});

function fakeServer(spawned: SpawnSandboxesResponse = SPAWNED): Controller {
  const transport = createRouterTransport(({ service }) => {
    service(SandboxService, {
      spawnSandboxes: () => spawned,
      branchSandbox: () => BRANCHED,
    });
    service(SnapshotService, {
      createSnapshot: (req) => ({
        snapshot: create(SnapshotSchema, { tag: req.tag, status: SnapshotStatus.READY }),
        sandboxId: req.keepRunning ? "sb-warm" : "",
      }),
    });
  });
  return new Controller({ transport });
}

describe("spawnSandboxes resolves to an array of its sandboxes", () => {
  test("indexing, length, iteration, destructuring", async () => {
    const res = await fakeServer().spawnSandboxes({ tag: "warm", n: 4 });
    assert.ok(res instanceof SpawnResult);
    assert.ok(Array.isArray(res));
    assert.equal(res.length, 3);
    assert.equal(res[0]?.id, "sb-one");
    assert.equal(res[2]?.image, "debian-12");
    assert.equal(res[3], undefined);
    assert.equal(res.at(-1)?.id, "sb-three");
    const ids: string[] = [];
    for (const sb of res) {
      ids.push(sb.id);
    }
    assert.deepEqual(ids, ["sb-one", "sb-two", "sb-three"]);
    const [first, ...rest] = res;
    assert.equal(first?.id, "sb-one");
    assert.equal(rest.length, 2);
    // Property access by name, as on any object.
    assert.equal(res[0]?.["id"], "sb-one");
    assert.deepEqual(res[0]?.["labels"], { team: "ts" });
  });

  test("array methods make plain arrays", async () => {
    const res = await fakeServer().spawnSandboxes({ tag: "warm", n: 4 });
    const ids = res.map((sb) => sb.id);
    assert.deepEqual(ids, ["sb-one", "sb-two", "sb-three"]);
    assert.equal(Object.getPrototypeOf(ids), Array.prototype);
    const tail = res.slice(1);
    assert.equal(Object.getPrototypeOf(tail), Array.prototype);
    assert.deepEqual(tail, SANDBOXES.slice(1));
    assert.deepEqual(res.filter((sb) => sb.image !== ""), [SANDBOXES[2]]);
    assert.deepEqual([...res], SANDBOXES);
    assert.deepEqual(Array.from(res), SANDBOXES);
  });

  test("the response's fields sit alongside, as before", async () => {
    const res = await fakeServer().spawnSandboxes({ tag: "warm", n: 4 });
    assert.deepEqual(res.sandboxes, SANDBOXES);
    assert.deepEqual(res.failures, SPAWNED.failures);
    assert.equal(res.failures[0]?.code, "RESOURCE_EXHAUSTED");
    assert.equal(res.elapsedMs, 12.5);
    const {
      sandboxes: [sb],
      failures,
    } = res;
    assert.equal(sb?.id, "sb-one");
    assert.equal(failures.length, 1);
    // Still the message for protobuf-es.
    assert.equal(res.$typeName, "forkd.v1.SpawnSandboxesResponse");
    assert.ok(isMessage(res, SpawnSandboxesResponseSchema));
    assert.deepEqual(toBinary(SpawnSandboxesResponseSchema, res), toBinary(SpawnSandboxesResponseSchema, SPAWNED));
    assert.deepEqual(toJson(SpawnSandboxesResponseSchema, res), toJson(SpawnSandboxesResponseSchema, SPAWNED));
    assert.ok(equals(SpawnSandboxesResponseSchema, res, SPAWNED));
    const asResponse: SpawnSandboxesResponse = res;
    assert.equal(asResponse.sandboxes.length, 3);
  });

  test("a result without sandboxes is empty, with its failures", async () => {
    const none = create(SpawnSandboxesResponseSchema, {
      failures: [{ index: 0, code: "INTERNAL", message: "boom" }],
    });
    const res = await fakeServer(none).spawnSandboxes();
    assert.equal(res.length, 0);
    assert.equal(res[0], undefined);
    assert.equal(res.failures[0]?.message, "boom");
  });

  test("SpawnResult wraps only a SpawnSandboxesResponse", () => {
    const res = new SpawnResult(SPAWNED);
    assert.equal(res.length, 3);
    assert.equal(res.sandboxes, SPAWNED.sandboxes, "shared, not copied");
    const bad = { sandboxes: [] } as unknown as SpawnSandboxesResponse;
    assert.throws(() => new SpawnResult(bad), TypeError);
  });
});

describe("branch and create-snapshot results carry the tag", () => {
  test("branchSandbox: tag is snapshot.tag; the message is unchanged", async () => {
    const res = await fakeServer().branchSandbox("sb-one", { tag: "branch-1", mode: "live", wait: false });
    assert.equal(res.tag, "branch-1");
    assert.equal(res["tag"], "branch-1");
    assert.equal(res.tag, res.snapshot?.tag);
    assert.equal(res.pauseMs, 0.4);
    assert.equal(res.dirtyPages, 7n);
    // tag is a non-enumerable getter: comparisons, spreads and encoding
    // see the proto fields only.
    assert.deepEqual(res, BRANCHED);
    assert.deepEqual(Object.keys({ ...res }).sort(), Object.keys(BRANCHED).sort());
    assert.ok(isMessage(res, BranchSandboxResponseSchema));
    assert.deepEqual(toBinary(BranchSandboxResponseSchema, res), toBinary(BranchSandboxResponseSchema, BRANCHED));
    const asResponse: BranchSandboxResponse = res;
    const typed: BranchResult = res;
    assert.equal(asResponse.snapshot?.tag, typed.tag);
  });

  test("createSnapshot: tag is snapshot.tag", async () => {
    const res = await fakeServer().createSnapshot({ tag: "warm", keepRunning: true });
    assert.equal(res.tag, "warm");
    assert.equal(res["tag"], "warm");
    assert.equal(res.sandboxId, "sb-warm");
    const asResponse: CreateSnapshotResponse = res;
    assert.equal(asResponse.snapshot?.status, SnapshotStatus.READY);
  });

  test("the earlier SDK's idioms", async () => {
    const forkd = fakeServer();
    const children = await forkd.spawnSandboxes({ tag: "warm", n: 3 });
    const branch = await forkd.branchSandbox("sb-one", { tag: "branch-1" });
    assert.equal(children[0]?.["id"], "sb-one");
    assert.deepEqual(
      children.map((c: Sandbox) => c["id"]),
      ["sb-one", "sb-two", "sb-three"],
    );
    assert.equal(branch["tag"], "branch-1");
  });
});
