/**
 * examples/file_roundtrip.ts, compiled, run as a user would run it, against
 * the stand-in file server (test/helpers/fileserver.ts) over real gRPC:
 * no daemon, no Linux guest.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdtemp, open, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { type FileServer, startFileServer } from "./helpers/fileserver.js";

/** dist/examples/file_roundtrip.js; this file runs from dist/test. */
const EXAMPLE = resolve(fileURLToPath(import.meta.url), "../../examples/file_roundtrip.js");
const MiB = 1 << 20;
const run = promisify(execFile);

async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/** Writes `mib` MiB of varied bytes to `path`, 1 MiB at a time. */
async function makeFile(path: string, mib: number, extra = 0): Promise<void> {
  const file = await open(path, "w");
  try {
    const block = Buffer.alloc(MiB);
    for (let i = 0; i < mib; i++) {
      for (let j = 0; j < MiB; j += 4) block.writeUInt32LE((i * MiB + j) >>> 0, j);
      await file.write(block);
    }
    await file.write(Buffer.alloc(extra, 7));
  } finally {
    await file.close();
  }
}

describe("examples/file_roundtrip", () => {
  let server: FileServer;
  let dir: string;
  before(async () => {
    server = await startFileServer();
    dir = await mkdtemp(join(tmpdir(), "forkd-ts-roundtrip-"));
  });
  after(async () => {
    await server?.close();
    await rm(dir, { recursive: true, force: true });
  });

  test("uploads, downloads and prints one JSON line with matching size and SHA-256", { timeout: 120_000 }, async () => {
    const local = join(dir, "in.bin");
    await makeFile(local, 24, 12345);
    const size = 24 * MiB + 12345;
    const sha256 = await sha256File(local);
    const downloaded = join(dir, "back.bin");
    const { stdout, stderr } = await run(
      process.execPath,
      [EXAMPLE, "sb-1", local, "/deep/dir/in.bin", downloaded],
      { env: { ...process.env, FORKD_TARGET: server.target, FORKD_TOKEN: "" } },
    );
    assert.equal(stderr, "");
    const lines = stdout.trimEnd().split("\n");
    assert.equal(lines.length, 1, stdout);
    assert.deepEqual(JSON.parse(lines[0] ?? ""), {
      uploaded: { size, sha256 },
      downloaded: { size, sha256 },
    });
    assert.equal(await sha256File(downloaded), sha256);
    assert.equal(await sha256File(join(server.root, "deep/dir/in.bin")), sha256);
    // 1 MiB reads are sent as 1 MiB messages.
    assert.deepEqual(server.uploads[0]?.chunkSizes, [...Array(24).fill(MiB), 12345]);
    assert.deepEqual((await readdir(dir)).sort(), ["back.bin", "in.bin"]);
  });

  test("bad arguments exit 2 with a usage line", async () => {
    const err = await run(process.execPath, [EXAMPLE, "sb-1"], {
      env: { ...process.env, FORKD_TARGET: server.target },
    }).then(
      () => assert.fail("exited 0"),
      (e: unknown) => e as { code: number; stderr: string },
    );
    assert.equal(err.code, 2);
    assert.match(err.stderr, /^usage: /);
  });

  test("a failing call exits 1 with the status", async () => {
    const local = join(dir, "small.txt");
    await makeFile(local, 0, 10);
    const err = await run(process.execPath, [EXAMPLE, "sb-1", local, "relative/path"], {
      env: { ...process.env, FORKD_TARGET: server.target },
    }).then(
      () => assert.fail("exited 0"),
      (e: unknown) => e as { code: number; stdout: string; stderr: string },
    );
    assert.equal(err.code, 1);
    assert.equal(err.stdout, "");
    assert.match(err.stderr, /^file_roundtrip: INVALID_ARGUMENT: bad path "relative\/path"/);
  });
});
