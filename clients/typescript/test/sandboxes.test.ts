/** Sandboxes and exec against a real daemon, and how errors map. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code, type Controller, type ExecEvent, SandboxState } from "../src/index.js";
import { rejectsWith } from "./helpers/assert.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";

const MIB = 64;
let daemon: Daemon;
let forkd: Controller;

before(async () => {
  daemon = await startDaemon();
  forkd = daemon.client;
});
after(() => daemon?.stop());

describe("spawn", () => {
  test("a cold boot starts one running sandbox", async () => {
    const res = await forkd.spawnSandboxes({ memoryMib: MIB });
    assert.equal(res.sandboxes.length, 1);
    assert.deepEqual(res.failures, []);
    assert.ok(res.elapsedMs > 0);
    const [sb] = res.sandboxes;
    assert.ok(sb);
    assert.match(sb.id, /^sb-/);
    assert.equal(sb.state, SandboxState.RUNNING);
    assert.equal(sb.snapshotTag, "");
    assert.equal(sb.memoryMib, MIB);
    assert.equal(sb.vcpus, 2);
    assert.equal(sb.liveFork, false);
    assert.ok(sb.vmmPid > 0);
    assert.ok(sb.bootMs > 0);
    await forkd.deleteSandbox(sb.id);
  });

  test("n=2 with labels and liveFork; list filters by label", async () => {
    const labels = { team: "spawn-test", run: String(process.pid) };
    const res = await forkd.spawnSandboxes({ n: 2, memoryMib: MIB, labels, liveFork: true });
    assert.equal(res.sandboxes.length, 2);
    const ids = res.sandboxes.map((s) => s.id);
    assert.equal(new Set(ids).size, 2);
    for (const sb of res.sandboxes) {
      assert.deepEqual(sb.labels, labels);
      assert.equal(sb.liveFork, true);
    }
    const listed = await forkd.listSandboxes({ labels: { team: "spawn-test" } });
    assert.deepEqual(listed.map((s) => s.id).sort(), [...ids].sort());
    assert.deepEqual(await forkd.listSandboxes({ labels: { team: "nobody" } }), []);
    for (const id of ids) {
      await forkd.deleteSandbox(id);
    }
  });
});

describe("huge pages", () => {
  test("more than the host's huge page pool is RESOURCE_EXHAUSTED naming the sysctl", async () => {
    // 64 GiB of 2 MiB pages: more than this kind of host has, pool or not.
    const err = await rejectsWith(
      forkd.spawnSandboxes({ memoryMib: 65536, hugePages: true }),
      "RESOURCE_EXHAUSTED",
    );
    assert.match(err.message, /huge_pages needs 32768 free 2 MiB huge pages/);
    assert.match(err.message, /vm\.nr_hugepages/);
  });

  test("odd memoryMib with hugePages is INVALID_ARGUMENT", async () => {
    const err = await rejectsWith(forkd.spawnSandboxes({ memoryMib: 65, hugePages: true }), "INVALID_ARGUMENT");
    assert.match(err.message, /memory_mib must be even with huge_pages/);
  });
});

describe("get, list, delete", () => {
  test("a sandbox is listed until deleted, then NOT_FOUND", async () => {
    const {
      sandboxes: [sb],
    } = await forkd.spawnSandboxes({ memoryMib: MIB });
    assert.ok(sb);
    const got = await forkd.getSandbox(sb.id);
    assert.equal(got.id, sb.id);
    assert.equal(got.state, SandboxState.RUNNING);
    assert.ok((await forkd.listSandboxes()).some((s) => s.id === sb.id));

    const deleted = await forkd.deleteSandbox(sb.id);
    assert.equal(deleted.id, sb.id);
    assert.ok(!(await forkd.listSandboxes()).some((s) => s.id === sb.id));
    await rejectsWith(forkd.getSandbox(sb.id), "NOT_FOUND");
    await rejectsWith(forkd.deleteSandbox(sb.id), "NOT_FOUND");
  });
});

describe("exec", () => {
  let id: string;
  before(async () => {
    const { sandboxes } = await forkd.spawnSandboxes({ memoryMib: MIB });
    id = sandboxes[0]?.id ?? assert.fail("no sandbox");
  });
  after(() => forkd.deleteSandbox(id));

  test("collects stdout and a zero exit", async () => {
    const res = await forkd.exec(id, ["echo", "hello", "forkd"]);
    assert.equal(res.stdoutText, "hello forkd\n");
    assert.equal(res.stderr.length, 0);
    assert.equal(res.exitCode, 0);
    assert.equal(res.ok, true);
    assert.equal(typeof res.durationUs, "bigint");
  });

  test("a non-zero exit code is a result, not an error", async () => {
    const res = await forkd.exec(id, ["exit", "7"]);
    assert.equal(res.exitCode, 7);
    assert.equal(res.ok, false);
  });

  test("an unknown command reports on stderr with a non-zero exit", async () => {
    const res = await forkd.exec(id, ["no-such-builtin"]);
    assert.notEqual(res.exitCode, 0);
    assert.match(res.stderrText, /no-such-builtin/);
    assert.equal(res.stdout.length, 0);
  });

  test("large output arrives whole", async () => {
    const res = await forkd.exec(id, ["emit", "100000"]);
    assert.equal(res.stdout.length, 100_000);
    assert.equal(res.exitCode, 0);
  });

  test("execStream yields output chunks, then one exit", async () => {
    const events: ExecEvent[] = [];
    for await (const ev of forkd.execStream(id, ["emit", "70000"])) {
      events.push(ev);
    }
    const last = events.at(-1);
    assert.equal(last?.kind, "exit");
    assert.equal(last.exitCode, 0);
    const out = events.flatMap((ev) => (ev.kind === "stdout" ? [ev.data.length] : []));
    assert.equal(out.reduce((a, b) => a + b, 0), 70_000);
    assert.equal(events.filter((ev) => ev.kind === "exit").length, 1);
  });

  test("leaving an execStream loop early cancels the command", { timeout: 15_000 }, async () => {
    // 50 MB is far more than HTTP/2 flow control lets the daemon send
    // unread: a stream left open would block the guest, and the next
    // command in this sandbox would wait behind it.
    let first: ExecEvent | undefined;
    for await (const ev of forkd.execStream(id, ["emit", "50000000"])) {
      first = ev;
      break;
    }
    assert.equal(first?.kind, "stdout");
    const res = await forkd.exec(id, ["echo", "next"]);
    assert.equal(res.stdoutText, "next\n");
  });

  test("timeoutMs stops a command with DEADLINE_EXCEEDED; the sandbox stays usable", async () => {
    const started = Date.now();
    await rejectsWith(forkd.exec(id, ["sleep", "5000"], { timeoutMs: 100 }), "DEADLINE_EXCEEDED");
    assert.ok(Date.now() - started < 4000);
    assert.equal((await forkd.exec(id, ["echo", "alive"])).stdoutText, "alive\n");
  });

  test("guest memory commands see the same data", async () => {
    assert.equal((await forkd.exec(id, ["fill", "8", "42"])).exitCode, 0);
    const a = await forkd.exec(id, ["checksum", "8"]);
    const b = await forkd.exec(id, ["checksum", "8"]);
    assert.match(a.stdoutText.trim(), /^[0-9a-f]{16}$/);
    assert.equal(a.stdoutText, b.stdoutText);
  });
});

describe("error mapping", () => {
  test("unknown sandbox ids are NOT_FOUND, on unary calls and streams", async () => {
    const err = await rejectsWith(forkd.getSandbox("sb-doesnotexist"), "NOT_FOUND");
    assert.equal(err.code, Code.NotFound);
    assert.match(err.rawMessage, /sb-doesnotexist/);
    await rejectsWith(forkd.exec("sb-doesnotexist", ["echo"]), "NOT_FOUND");
    await rejectsWith(forkd.branchSandbox("sb-doesnotexist"), "NOT_FOUND");
    const stream = async (): Promise<void> => {
      for await (const ev of forkd.execStream("sb-doesnotexist", ["echo"])) {
        assert.fail(`unexpected event ${ev.kind}`);
      }
    };
    await rejectsWith(stream(), "NOT_FOUND");
  });

  test("out-of-range input is INVALID_ARGUMENT", async () => {
    const err = await rejectsWith(forkd.spawnSandboxes({ n: 0 }), "INVALID_ARGUMENT");
    assert.equal(err.code, Code.InvalidArgument);
    assert.match(err.rawMessage, /\bn\b/);
    await rejectsWith(forkd.spawnSandboxes({ n: 1001 }), "INVALID_ARGUMENT");
    await rejectsWith(forkd.spawnSandboxes({ memoryMib: 10 }), "INVALID_ARGUMENT");
    await rejectsWith(forkd.spawnSandboxes({ labels: { Upper: "x" } }), "INVALID_ARGUMENT");
  });

  test("client-side argument errors reject before any call", async () => {
    const bad = { mode: "fast" } as unknown as { mode: "full" };
    await assert.rejects(forkd.branchSandbox("sb-x", bad), RangeError);
    await assert.rejects(forkd.spawnSandboxes({ n: -1 }), RangeError);
    assert.throws(() => forkd.execStream("sb-x", "echo" as unknown as string[]), TypeError);
  });

  test("a closed controller rejects with CANCELLED", async () => {
    const c = daemon.connect();
    assert.ok(Array.isArray(await c.listSandboxes()));
    c.close();
    await rejectsWith(c.listSandboxes(), "CANCELLED");
  });
});
