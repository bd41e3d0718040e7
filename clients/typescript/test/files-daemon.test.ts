/**
 * The file calls against a real daemon. This project's machines cannot boot
 * a Linux guest, so what is checked is the reference guest's refusal: every
 * file call is FAILED_PRECONDITION, and an upload refused mid-stream lets
 * go of its source. The transfers themselves are covered by files.test.ts
 * (in memory and over HTTP/2 against a stand-in server) and by the
 * end-to-end suite's Linux-guest tests.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { Controller } from "../src/index.js";
import { rejectsWith } from "./helpers/assert.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";

let daemon: Daemon;
let forkd: Controller;
let sandboxId: string;

before(async () => {
  daemon = await startDaemon();
  forkd = daemon.client;
  const [sb] = await forkd.spawnSandboxes({ memoryMib: 64 });
  sandboxId = sb?.id ?? assert.fail("no sandbox");
});
after(() => daemon?.stop());

describe("file calls on a reference-guest sandbox", () => {
  test("every file call is FAILED_PRECONDITION", async () => {
    await rejectsWith(forkd.writeFile(sandboxId, "/tmp/x", "hello"), "FAILED_PRECONDITION");
    await rejectsWith(forkd.readFileBytes(sandboxId, "/etc/hostname"), "FAILED_PRECONDITION");
    await rejectsWith(forkd.statFile(sandboxId, "/"), "FAILED_PRECONDITION");
    await rejectsWith(forkd.listDir(sandboxId, "/"), "FAILED_PRECONDITION");
    await rejectsWith(forkd.removeFile(sandboxId, "/tmp/x"), "FAILED_PRECONDITION");
    const err = await rejectsWith(
      (async () => {
        for await (const _ of forkd.readFile(sandboxId, "/etc/hostname"));
      })(),
      "FAILED_PRECONDITION",
    );
    assert.ok(err.rawMessage.length > 0);
  });

  test("an endless upload is refused, and its source is let go of", { timeout: 30_000 }, async () => {
    let pulled = 0;
    let closed = false;
    async function* endless(): AsyncGenerator<Uint8Array> {
      try {
        for (;;) {
          pulled++;
          yield new Uint8Array(64 * 1024);
        }
      } finally {
        closed = true;
      }
    }
    await rejectsWith(forkd.writeFile(sandboxId, "/tmp/big", endless()), "FAILED_PRECONDITION");
    await new Promise((resolve) => setImmediate(resolve));
    assert.ok(closed, "the source's finally ran");
    assert.ok(pulled < 1000, `pulled ${pulled} chunks of 64 KiB`);
    // The connection is still good.
    assert.equal((await forkd.getSandbox(sandboxId)).id, sandboxId);
  });
});
