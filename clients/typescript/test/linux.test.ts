/**
 * What Linux guests added to the API, without a daemon (this project's
 * machines cannot boot a Linux guest): the request builders on encoded
 * bytes, and the Controller against Connect's in-memory router transport,
 * which checks that `image` (SpawnSandboxes and CreateSnapshot), `env`, `cwd`
 * and `stdin` reach the server and that `signal`, the console and a
 * snapshot's `image` come back.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";
import {
  Controller,
  type CreateSnapshotRequest,
  CreateSnapshotRequestSchema,
  type ExecRequest,
  ExecRequestSchema,
  ReadConsoleRequestSchema,
  ReadConsoleResponseSchema,
  SandboxSchema,
  SandboxService,
  SnapshotSchema,
  SnapshotService,
  type SpawnSandboxesRequest,
  SpawnSandboxesRequestSchema,
  createSnapshotRequest,
  execRequest,
  readConsoleRequest,
  spawnSandboxesRequest,
} from "../src/index.js";
import { collectExec, toExecEvent } from "../src/exec.js";
import { ExecResponseSchema } from "../src/gen/forkd/v1/sandbox_pb.js";
import { wireFields } from "./helpers/wire.js";

// Field numbers from proto/forkd/v1/sandbox.proto and snapshot.proto.
const SPAWN_IMAGE = 8;
const CREATE_SNAPSHOT = { tag: 1, memoryMib: 2, image: 6 } as const;
const EXEC = { sandboxId: 1, argv: 2, timeoutMs: 3, env: 4, cwd: 5, stdin: 6 } as const;
const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);

describe("request builders", () => {
  test("image is sent as field 8 only when given", () => {
    const f = wireFields(
      toBinary(SpawnSandboxesRequestSchema, spawnSandboxesRequest({ image: "debian-12" })),
    );
    assert.deepEqual(f.get(SPAWN_IMAGE), [utf8("debian-12")]);
    assert.equal(f.has(1), false, "no snapshot tag");
    for (const opts of [{}, { image: "" }, { tag: "warm" }]) {
      const g = wireFields(toBinary(SpawnSandboxesRequestSchema, spawnSandboxesRequest(opts)));
      assert.equal(g.has(SPAWN_IMAGE), false, JSON.stringify(opts));
    }
    const bad = { image: 7 } as unknown as { image: string };
    assert.throws(() => spawnSandboxesRequest(bad), { name: "TypeError", message: /image/ });
  });

  test("createSnapshot's image is sent as field 6 only when given", () => {
    const f = wireFields(
      toBinary(
        CreateSnapshotRequestSchema,
        createSnapshotRequest({ tag: "deb", image: "debian-12", warmup: [["apt-get", "update"]] }),
      ),
    );
    assert.deepEqual(f.get(CREATE_SNAPSHOT.image), [utf8("debian-12")]);
    assert.deepEqual(f.get(CREATE_SNAPSHOT.tag), [utf8("deb")]);
    assert.equal(f.has(CREATE_SNAPSHOT.memoryMib), false, "absent memoryMib: the image's default");
    for (const opts of [{}, { image: "" }, { tag: "ref", memoryMib: 256 }]) {
      const g = wireFields(toBinary(CreateSnapshotRequestSchema, createSnapshotRequest(opts)));
      assert.equal(g.has(CREATE_SNAPSHOT.image), false, JSON.stringify(opts));
    }
    const bad = { image: ["debian-12"] } as unknown as { image: string };
    assert.throws(() => createSnapshotRequest(bad), { name: "TypeError", message: /image/ });
  });

  test("env, cwd and stdin are sent when given; a string stdin as UTF-8", () => {
    const req = execRequest("sb-1", ["sh", "-c", "cat"], {
      env: { GREETING: "hi", LANG: "C.UTF-8" },
      cwd: "/tmp",
      stdin: "héllo",
    });
    assert.deepEqual(req.env, { GREETING: "hi", LANG: "C.UTF-8" });
    assert.equal(req.cwd, "/tmp");
    assert.deepEqual(req.stdin, utf8("héllo"));
    const f = wireFields(toBinary(ExecRequestSchema, req));
    assert.equal(f.get(EXEC.env)?.length, 2, "one map entry per variable");
    assert.deepEqual(f.get(EXEC.cwd), [utf8("/tmp")]);
    assert.deepEqual(f.get(EXEC.stdin), [utf8("héllo")]);

    const raw = new Uint8Array([0, 1, 255]);
    assert.deepEqual(execRequest("sb-1", ["cat"], { stdin: raw }).stdin, raw);
  });

  test("without env, cwd and stdin the request is what older clients sent", () => {
    const f = wireFields(toBinary(ExecRequestSchema, execRequest("sb-1", ["echo", "hi"])));
    assert.deepEqual([...f.keys()].sort(), [EXEC.sandboxId, EXEC.argv]);
    const g = wireFields(
      toBinary(ExecRequestSchema, execRequest("sb-1", ["cat"], { stdin: new Uint8Array(0) })),
    );
    assert.equal(g.has(EXEC.stdin), false, "empty stdin means /dev/null");
  });

  test("values that cannot be encoded are rejected before sending", () => {
    const badEnv = { env: { N: 1 } } as unknown as { env: Record<string, string> };
    assert.throws(() => execRequest("sb-1", ["env"], badEnv), { name: "TypeError", message: /env\.N/ });
    const badStdin = { stdin: [1, 2] } as unknown as { stdin: Uint8Array };
    assert.throws(() => execRequest("sb-1", ["cat"], badStdin), { name: "TypeError", message: /stdin/ });
    const badCwd = { cwd: 1 } as unknown as { cwd: string };
    assert.throws(() => execRequest("sb-1", ["pwd"], badCwd), { name: "TypeError", message: /cwd/ });
    assert.throws(() => readConsoleRequest("sb-1", { tailBytes: -1 }), RangeError);
  });

  test("readConsoleRequest carries the id and tailBytes (absent: 0)", () => {
    const f = wireFields(
      toBinary(ReadConsoleRequestSchema, readConsoleRequest("sb-1", { tailBytes: 4096 })),
    );
    assert.deepEqual(f.get(1), [utf8("sb-1")]);
    assert.deepEqual(f.get(2), [4096n]);
    assert.equal(readConsoleRequest("sb-1").tailBytes, 0);
  });
});

describe("exec signal", () => {
  test("toExecEvent and collectExec carry ExecExit.signal", async () => {
    const msg = create(ExecResponseSchema, {
      event: { case: "exit", value: { exitCode: 137, durationUs: 5n, signal: 9 } },
    });
    const ev = toExecEvent(msg);
    assert.deepEqual(ev, { kind: "exit", exitCode: 137, durationUs: 5n, signal: 9 });
    async function* one(): AsyncGenerator<NonNullable<typeof ev>> {
      if (ev !== undefined) yield ev;
    }
    const result = await collectExec(one());
    assert.equal(result.signal, 9);
    assert.equal(result.exitCode, 137);
  });

  test("an exit event without signal gives 0", async () => {
    async function* events(): AsyncGenerator<{ kind: "exit"; exitCode: number; durationUs: bigint }> {
      yield { kind: "exit", exitCode: 0, durationUs: 1n };
    }
    assert.equal((await collectExec(events())).signal, 0);
  });
});

describe("Controller against an in-memory server", () => {
  function fakeServer(): {
    forkd: Controller;
    spawns: SpawnSandboxesRequest[];
    execs: ExecRequest[];
    snapshots: CreateSnapshotRequest[];
  } {
    const spawns: SpawnSandboxesRequest[] = [];
    const execs: ExecRequest[] = [];
    const snapshots: CreateSnapshotRequest[] = [];
    const transport = createRouterTransport(({ service }) => {
      service(SnapshotService, {
        createSnapshot(req) {
          snapshots.push(req);
          return { snapshot: create(SnapshotSchema, { tag: req.tag, image: req.image }) };
        },
      });
      service(SandboxService, {
        spawnSandboxes(req) {
          spawns.push(req);
          const sandbox = create(SandboxSchema, {
            id: "sb-linux",
            image: req.image,
            guestBoot: { kernelMs: 120.5, initMs: 3.25 },
          });
          return { sandboxes: [sandbox] };
        },
        async *exec(req) {
          execs.push(req);
          yield { event: { case: "stdout", value: req.stdin } };
          yield { event: { case: "exit", value: { exitCode: 143, durationUs: 7n, signal: 15 } } };
        },
        readConsole(req) {
          return create(ReadConsoleResponseSchema, {
            data: utf8(`console of ${req.sandboxId}, last ${req.tailBytes}`),
            truncated: req.tailBytes > 0,
          });
        },
      });
    });
    return { forkd: new Controller({ transport }), spawns, execs, snapshots };
  }

  test("spawnSandboxes sends image; the sandbox reports it and its guest boot", async () => {
    const { forkd, spawns } = fakeServer();
    const res = await forkd.spawnSandboxes({ image: "debian-12", memoryMib: 512 });
    assert.equal(spawns[0]?.image, "debian-12");
    const sb = res.sandboxes[0] ?? assert.fail("no sandbox");
    assert.equal(sb.image, "debian-12");
    assert.equal(sb.guestBoot?.kernelMs, 120.5);
    assert.equal(sb.guestBoot?.initMs, 3.25);
  });

  test("createSnapshot sends image; the snapshot reports it", async () => {
    const { forkd, snapshots } = fakeServer();
    const res = await forkd.createSnapshot({ tag: "deb", image: "debian-12", keepRunning: true });
    assert.equal(snapshots[0]?.image, "debian-12");
    assert.equal(snapshots[0]?.keepRunning, true);
    assert.equal(res.snapshot?.image, "debian-12");
    const ref = await forkd.createSnapshot({ tag: "ref" });
    assert.equal(snapshots[1]?.image, "");
    assert.equal(ref.snapshot?.image, "", "the reference guest's snapshot has no image");
  });

  test("exec and execStream send env, cwd and stdin and surface the signal", async () => {
    const { forkd, execs } = fakeServer();
    const result = await forkd.exec("sb-linux", ["cat"], {
      env: { A: "1" },
      cwd: "/srv",
      stdin: "piped",
    });
    assert.deepEqual(execs[0]?.env, { A: "1" });
    assert.equal(execs[0]?.cwd, "/srv");
    assert.equal(result.stdoutText, "piped");
    assert.equal(result.exitCode, 143);
    assert.equal(result.signal, 15);

    const kinds: string[] = [];
    let signal: number | undefined;
    for await (const ev of forkd.execStream("sb-linux", ["cat"], { stdin: utf8("x") })) {
      kinds.push(ev.kind);
      if (ev.kind === "exit") signal = ev.signal;
    }
    assert.deepEqual(kinds, ["stdout", "exit"]);
    assert.equal(signal, 15);
  });

  test("readConsole returns the data and truncated flag", async () => {
    const { forkd } = fakeServer();
    const tail = await forkd.readConsole("sb-linux", { tailBytes: 100 });
    assert.equal(new TextDecoder().decode(tail.data), "console of sb-linux, last 100");
    assert.equal(tail.truncated, true);
    const all = await forkd.readConsole("sb-linux");
    assert.equal(new TextDecoder().decode(all.data), "console of sb-linux, last 0");
    assert.equal(all.truncated, false);
  });
});
