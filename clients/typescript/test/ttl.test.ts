/** Sandbox lifetimes against a real daemon: ttlSeconds, expireTime, setSandboxTtl. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Controller, SandboxState } from "../src/index.js";
import { rejectsWith } from "./helpers/assert.js";
import { type Daemon, startDaemon } from "./helpers/daemon.js";

const MIB = 64;
let daemon: Daemon;
let forkd: Controller;

before(async () => {
  daemon = await startDaemon({ args: ["--max-ttl", "600"] });
  forkd = daemon.client;
});
after(() => daemon?.stop());

describe("ttl", () => {
  test("spawn with ttlSeconds shows expireTime; setSandboxTtl extends, clears, shortens", { timeout: 90_000 }, async () => {
    const {
      sandboxes: [sb],
    } = await forkd.spawnSandboxes({ memoryMib: MIB, ttlSeconds: 600 });
    assert.ok(sb?.expireTime, "expireTime set");
    const left = timestampDate(sb.expireTime).getTime() - Date.now();
    assert.ok(left > 590_000 && left <= 601_000, `expires in ${left} ms`);

    await rejectsWith(forkd.setSandboxTtl(sb.id, 601), "INVALID_ARGUMENT");
    await rejectsWith(forkd.spawnSandboxes({ memoryMib: MIB, ttlSeconds: 601 }), "INVALID_ARGUMENT");
    const cleared = await forkd.setSandboxTtl(sb.id, 0);
    assert.equal(cleared.expireTime, undefined);
    assert.equal((await forkd.getSandbox(sb.id)).expireTime, undefined);

    const short = await forkd.setSandboxTtl(sb.id, 1n);
    assert.ok(short.expireTime);
    assert.equal(short.state, SandboxState.RUNNING);
    const deadline = Date.now() + 60_000;
    while ((await forkd.listSandboxes()).some((s) => s.id === sb.id)) {
      assert.ok(Date.now() < deadline, `${sb.id} never expired`);
      await new Promise((r) => setTimeout(r, 200));
    }
    await rejectsWith(forkd.getSandbox(sb.id), "NOT_FOUND");
    await rejectsWith(forkd.setSandboxTtl(sb.id, 5), "NOT_FOUND");
  });
});
