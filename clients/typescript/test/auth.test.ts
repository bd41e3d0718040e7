/** Bearer-token auth against a daemon started with --token-file. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Code, ForkdError } from "../src/index.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";

const TOKEN = `ts-test-${process.pid}-${Date.now()}`;
let daemon: Daemon;

before(async () => {
  daemon = await startDaemon({ token: TOKEN });
});
after(() => daemon?.stop());

async function unauthenticated(promise: Promise<unknown>): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof ForkdError, String(err));
    assert.equal(err.code, Code.Unauthenticated);
    assert.equal(err.codeName, "UNAUTHENTICATED");
    return true;
  });
}

test("without a token every call is UNAUTHENTICATED", async () => {
  const anonymous = daemon.connect({ token: undefined });
  await unauthenticated(anonymous.listSandboxes());
  await unauthenticated(anonymous.spawnSandboxes({ memoryMib: 64 }));
  await unauthenticated(anonymous.getSnapshot("any"));
  const stream = async (): Promise<void> => {
    for await (const u of anonymous.watchSnapshot("any")) {
      assert.fail(`unexpected update ${u.tag}`);
    }
  };
  await unauthenticated(stream());
});

test("a wrong token is UNAUTHENTICATED", async () => {
  await unauthenticated(daemon.connect({ token: `${TOKEN}-wrong` }).listSandboxes());
});

test("with the token, calls work", async () => {
  const forkd = daemon.client;
  const res = await forkd.spawnSandboxes({ memoryMib: 64 });
  const id = res.sandboxes[0]?.id ?? assert.fail("no sandbox");
  assert.equal((await forkd.exec(id, ["echo", "authorized"])).stdoutText, "authorized\n");
  assert.deepEqual(
    (await forkd.listSandboxes()).map((s) => s.id),
    [id],
  );
  assert.equal((await forkd.deleteSandbox(id)).id, id);
});
