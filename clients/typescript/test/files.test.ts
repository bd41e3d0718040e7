/**
 * The file calls (writeFile, readFile, readFileBytes, readFileTo, statFile,
 * listDir, removeFile) without a daemon: the request builders on encoded
 * bytes, the Controller against Connect's in-memory router transport
 * (chunking, lazy reading of the source, checksums, a stream cut short,
 * atomic local files, error mapping), and the upload's laziness over real
 * HTTP/2 against a stand-in server (test/helpers/fileserver.ts).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type ServiceImpl, createRouterTransport } from "@connectrpc/connect";
import {
  Controller,
  DEFAULT_UPLOAD_CHUNK_SIZE,
  FileType,
  ForkdError,
  MAX_UPLOAD_CHUNK_SIZE,
  ReadFileRequestSchema,
  type ReadFileResponse,
  SandboxService,
  WriteFileHeaderSchema,
  type WriteFileHeader,
  listDirRequest,
  readFileRequest,
  removeFileRequest,
  statFileRequest,
  uploadChunkSize,
  writeFileHeader,
} from "../src/index.js";
import { rechunk } from "../src/files.js";
import { rejectsWith } from "./helpers/assert.js";
import { startFileServer } from "./helpers/fileserver.js";
import { H2, startWireProxy, wireFields } from "./helpers/wire.js";

const MiB = 1 << 20;
const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);
const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

/** `n` bytes of a repeating pattern that differs from offset to offset. */
function pattern(n: number, seed = 0): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = (i * 31 + seed + (i >> 8)) & 0xff;
  }
  return out;
}

function concat(chunks: readonly Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(chunks));
}

type Impl = Partial<ServiceImpl<typeof SandboxService>>;

/** A Controller on an in-memory server implementing `impl`. */
function serve(impl: Impl): Controller {
  return new Controller({
    transport: createRouterTransport(({ service }) => service(SandboxService, impl)),
  });
}

/** What a fake WriteFile handler saw. */
interface Received {
  header?: WriteFileHeader;
  chunks: Uint8Array[];
  /** The client half-closed: the daemon would rename the file into place. */
  completed: boolean;
  error?: unknown;
}

/** A WriteFile handler that records the upload and answers honestly (or not). */
function recordingWrite(
  received: Received[],
  opts: {
    onData?: (r: Received) => Promise<void> | void;
    answer?: (r: Received) => { path: string; size: bigint; sha256: string };
  } = {},
): NonNullable<Impl["writeFile"]> {
  return async (requests) => {
    const r: Received = { chunks: [], completed: false };
    received.push(r);
    try {
      for await (const msg of requests) {
        if (msg.content.case === "header") {
          r.header = msg.content.value;
        } else if (msg.content.case === "data") {
          r.chunks.push(msg.content.value);
          await opts.onData?.(r);
        }
      }
      r.completed = true;
    } catch (err) {
      r.error = err;
      throw err;
    }
    const all = concat(r.chunks);
    return (
      opts.answer?.(r) ?? {
        path: r.header?.path ?? "",
        size: BigInt(all.length),
        sha256: sha256(all),
      }
    );
  };
}

/** A ReadFile handler that sends `data` in 64 KiB chunks and then `end`. */
function sending(
  data: Uint8Array,
  end: Partial<{ size: bigint; sha256: string; fileSize: bigint }> | null = {},
  extra: ReadFileResponse["event"][] = [],
): NonNullable<Impl["readFile"]> {
  return async function* () {
    for (let pos = 0; pos < data.length; pos += 64 * 1024) {
      yield { event: { case: "data", value: data.subarray(pos, pos + 64 * 1024) } };
    }
    if (end !== null) {
      yield {
        event: {
          case: "end",
          value: {
            size: BigInt(data.length),
            sha256: sha256(data),
            fileSize: BigInt(data.length),
            ...end,
          },
        },
      };
    }
    for (const event of extra) {
      yield { event };
    }
  };
}

describe("request builders", () => {
  test("writeFileHeader carries every option; absent ones stay off the wire", () => {
    const h = writeFileHeader("sb-1", "/srv/app.py", { mode: 0o755, makeParents: true, noOverwrite: true });
    const f = wireFields(toBinary(WriteFileHeaderSchema, h));
    assert.deepEqual(f.get(1), [utf8("sb-1")]);
    assert.deepEqual(f.get(2), [utf8("/srv/app.py")]);
    assert.deepEqual(f.get(3), [0o755n]);
    assert.deepEqual(f.get(4), [1n]);
    assert.deepEqual(f.get(5), [1n]);
    const g = wireFields(toBinary(WriteFileHeaderSchema, writeFileHeader("sb-1", "/f")));
    assert.deepEqual([...g.keys()].sort(), [1, 2]);
    assert.throws(() => writeFileHeader("sb-1", "/f", { mode: -1 }), RangeError);
    const bad = { makeParents: "yes" } as unknown as { makeParents: boolean };
    assert.throws(() => writeFileHeader("sb-1", "/f", bad), { name: "TypeError", message: /makeParents/ });
    assert.throws(() => writeFileHeader("sb-1", 7 as unknown as string), { name: "TypeError", message: /path/ });
  });

  test("uploadChunkSize defaults to 1 MiB and allows 1 byte to 3 MiB", () => {
    assert.equal(uploadChunkSize(), DEFAULT_UPLOAD_CHUNK_SIZE);
    assert.equal(DEFAULT_UPLOAD_CHUNK_SIZE, MiB);
    assert.equal(uploadChunkSize({ chunkSize: 1 }), 1);
    assert.equal(uploadChunkSize({ chunkSize: MAX_UPLOAD_CHUNK_SIZE }), 3 * MiB);
    for (const chunkSize of [0, -1, 1.5, 3 * MiB + 1, Number.NaN]) {
      assert.throws(() => uploadChunkSize({ chunkSize }), { name: "RangeError", message: /chunkSize/ });
    }
  });

  test("readFileRequest takes offset and length as numbers or bigints", () => {
    const req = readFileRequest("sb-1", "/var/log/syslog", { offset: 10, length: 5n });
    assert.equal(req.offset, 10n);
    assert.equal(req.length, 5n);
    const f = wireFields(toBinary(ReadFileRequestSchema, req));
    assert.deepEqual(f.get(3), [10n]);
    assert.deepEqual(f.get(4), [5n]);
    const whole = wireFields(toBinary(ReadFileRequestSchema, readFileRequest("sb-1", "/f")));
    assert.deepEqual([...whole.keys()].sort(), [1, 2], "the whole file: no offset, no length");
    assert.throws(() => readFileRequest("sb-1", "/f", { offset: -1 }), RangeError);
    assert.throws(() => readFileRequest("sb-1", "/f", { length: 0.5 }), RangeError);
  });

  test("stat, list and remove requests", () => {
    assert.equal(statFileRequest("sb-1", "/etc").path, "/etc");
    assert.equal(listDirRequest("sb-1", "/etc").sandboxId, "sb-1");
    assert.equal(removeFileRequest("sb-1", "/tmp/x").recursive, false);
    assert.equal(removeFileRequest("sb-1", "/tmp/x", { recursive: true }).recursive, true);
    const bad = { recursive: 1 } as unknown as { recursive: boolean };
    assert.throws(() => removeFileRequest("sb-1", "/tmp/x", bad), { name: "TypeError", message: /recursive/ });
  });
});

describe("rechunk", () => {
  test("gathers small chunks and splits large ones into pieces of the size", async () => {
    const input = [pattern(3), pattern(5, 1), new Uint8Array(0), pattern(10, 2), pattern(1, 3)];
    const pieces: Uint8Array[] = [];
    for await (const p of rechunk(input, 4)) pieces.push(new Uint8Array(p));
    assert.deepEqual(
      pieces.map((p) => p.length),
      [4, 4, 4, 4, 3],
    );
    assert.deepEqual(concat(pieces), concat(input));
  });

  test("a large chunk is split into views of itself, not copied (but its tail is)", async () => {
    const big = pattern(10);
    const pieces: Uint8Array[] = [];
    for await (const p of rechunk([big], 4)) pieces.push(p);
    assert.deepEqual(
      pieces.map((p) => p.length),
      [4, 4, 2],
    );
    assert.ok(pieces[0]?.buffer === big.buffer && pieces[1]?.buffer === big.buffer);
    assert.equal(pieces[1]?.byteOffset, 4);
    assert.deepEqual(concat(pieces), big);
  });

  test("a chunk that is not bytes is a TypeError", async () => {
    const it = rechunk([pattern(2), "text" as unknown as Uint8Array], 4);
    await assert.rejects(async () => {
      for await (const _ of it);
    }, { name: "TypeError", message: /chunk 1 is a string/ });
  });
});

describe("writeFile against an in-memory server", () => {
  test("sends the header first, then the bytes in chunkSize pieces; resolves with the guest's account", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    const data = pattern(2 * MiB + MiB / 2);
    const res = await forkd.writeFile("sb-1", "/srv/data.bin", data, { mode: 0o600, makeParents: true });
    const r = received[0] ?? assert.fail("no upload");
    assert.equal(r.header?.sandboxId, "sb-1");
    assert.equal(r.header?.path, "/srv/data.bin");
    assert.equal(r.header?.mode, 0o600);
    assert.equal(r.header?.makeParents, true);
    assert.equal(r.header?.noOverwrite, false);
    assert.deepEqual(
      r.chunks.map((c) => c.length),
      [MiB, MiB, MiB / 2],
    );
    assert.deepEqual(concat(r.chunks), data);
    assert.equal(r.completed, true);
    assert.equal(res.path, "/srv/data.bin");
    assert.equal(res.size, BigInt(data.length));
    assert.equal(res.sha256, sha256(data));
  });

  test("a string is uploaded as UTF-8; chunkSize applies to any source", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    await forkd.writeFile("sb-1", "/etc/motd", "héllo wörld\n", { chunkSize: 5 });
    assert.deepEqual(concat(received[0]?.chunks ?? []), utf8("héllo wörld\n"));
    assert.deepEqual(
      received[0]?.chunks.map((c) => c.length),
      [5, 5, 4],
    );
  });

  test("iterables and async iterables: small chunks are gathered, large ones split", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    const parts = [pattern(3), pattern(3, 1), pattern(20, 2), pattern(1, 3)];
    await forkd.writeFile("sb-1", "/a", parts, { chunkSize: 8 });
    async function* gen(): AsyncGenerator<Uint8Array> {
      yield* parts;
    }
    await forkd.writeFile("sb-1", "/b", gen(), { chunkSize: 8 });
    for (const r of received) {
      assert.deepEqual(
        r.chunks.map((c) => c.length),
        [8, 8, 8, 3],
      );
      assert.deepEqual(concat(r.chunks), concat(parts));
    }
  });

  test("an empty source sends the header only", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    for (const empty of [new Uint8Array(0), "", [], [new Uint8Array(0)]]) {
      const res = await forkd.writeFile("sb-1", "/empty", empty);
      assert.equal(res.size, 0n);
      assert.equal(res.sha256, sha256(new Uint8Array(0)));
    }
    assert.ok(received.every((r) => r.header !== undefined && r.chunks.length === 0 && r.completed));
  });

  test("the source is pulled only as the transport sends", async () => {
    let pulled = 0;
    const lead: number[] = [];
    const received: Received[] = [];
    const forkd = serve({
      writeFile: recordingWrite(received, {
        async onData(r) {
          lead.push(pulled - r.chunks.length);
          await new Promise((resolve) => setTimeout(resolve, 1)); // a slow guest
        },
      }),
    });
    async function* source(): AsyncGenerator<Uint8Array> {
      for (let i = 0; i < 40; i++) {
        pulled++;
        yield pattern(1024, i);
      }
    }
    const res = await forkd.writeFile("sb-1", "/lazy", source(), { chunkSize: 1024 });
    assert.equal(res.size, 40n * 1024n);
    assert.equal(lead.length, 40);
    assert.ok(Math.max(...lead) <= 2, `source read ahead by ${Math.max(...lead)} chunks: ${lead.join(",")}`);
  });

  test("a failing source cancels the upload and rejects with the source's error", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    const boom = new Error("disk gone");
    async function* source(): AsyncGenerator<Uint8Array> {
      yield pattern(100);
      yield pattern(100, 1);
      throw boom;
    }
    const err = await forkd.writeFile("sb-1", "/partial", source(), { chunkSize: 100 }).then(
      () => assert.fail("resolved"),
      (e: unknown) => e,
    );
    assert.equal(err, boom);
    const r = received[0] ?? assert.fail("no upload");
    assert.equal(r.completed, false, "the server must not see a complete upload");

    const notBytes = [pattern(4), "text"] as unknown as Uint8Array[];
    await assert.rejects(forkd.writeFile("sb-1", "/typed", notBytes), {
      name: "TypeError",
      message: /chunk 1 is a string/,
    });
    assert.equal(received[1]?.completed, false);
  });

  test("arguments are checked before anything is sent", async () => {
    const received: Received[] = [];
    const forkd = serve({ writeFile: recordingWrite(received) });
    await assert.rejects(forkd.writeFile("sb-1", "/f", 42 as unknown as string), {
      name: "TypeError",
      message: /source must be/,
    });
    await assert.rejects(forkd.writeFile("sb-1", "/f", "x", { chunkSize: 4 * MiB }), RangeError);
    await assert.rejects(forkd.writeFile("sb-1", "/f", "x", { mode: 1.5 }), RangeError);
    assert.equal(received.length, 0);
  });

  test("a daemon error is a ForkdError, and the source is let go of", async () => {
    let closed = false;
    let pulled = 0;
    async function* source(): AsyncGenerator<Uint8Array> {
      try {
        for (;;) {
          pulled++;
          yield pattern(1024);
        }
      } finally {
        closed = true;
      }
    }
    const forkd = serve({
      async writeFile(requests) {
        for await (const msg of requests) {
          if (msg.content.case === "data") {
            throw new ConnectError("sandbox sb-1 runs the reference guest", Code.FailedPrecondition);
          }
        }
        return {};
      },
    });
    const err = await rejectsWith(forkd.writeFile("sb-1", "/f", source(), { chunkSize: 1024 }), "FAILED_PRECONDITION");
    assert.equal(err.code, Code.FailedPrecondition);
    assert.match(err.rawMessage, /reference guest/);
    await new Promise((resolve) => setImmediate(resolve));
    assert.ok(closed, "the source's finally ran");
    assert.ok(pulled < 10, `pulled ${pulled}`);
  });

  test("an error before anything was read still closes the source", async () => {
    let closed = false;
    const source = {
      [Symbol.asyncIterator]() {
        return {
          next: async () => ({ done: false as const, value: pattern(1) }),
          return: async () => {
            closed = true;
            return { done: true as const, value: undefined };
          },
        };
      },
    };
    const forkd = serve({});
    forkd.close();
    await rejectsWith(forkd.writeFile("sb-1", "/f", source), "CANCELLED");
    await new Promise((resolve) => setImmediate(resolve));
    assert.ok(closed);
  });

  test("errors map to ForkdError codes", async () => {
    for (const [code, name] of [
      [Code.NotFound, "NOT_FOUND"],
      [Code.AlreadyExists, "ALREADY_EXISTS"],
      [Code.ResourceExhausted, "RESOURCE_EXHAUSTED"],
      [Code.InvalidArgument, "INVALID_ARGUMENT"],
    ] as const) {
      const forkd = serve({
        async writeFile() {
          throw new ConnectError("no", code);
        },
      });
      await rejectsWith(forkd.writeFile("sb-1", "/x", "data"), name);
    }
  });

  test("a guest checksum that differs from what was sent is DATA_LOSS", async () => {
    const received: Received[] = [];
    const forkd = serve({
      writeFile: recordingWrite(received, {
        answer: (r) => ({ path: r.header?.path ?? "", size: 4n, sha256: "00".repeat(32) }),
      }),
    });
    const err = await rejectsWith(forkd.writeFile("sb-1", "/f", "data"), "DATA_LOSS");
    assert.match(err.message, /sent 4 bytes with SHA-256 [0-9a-f]{64}, but the guest wrote 4 bytes/);
    const short = serve({
      writeFile: recordingWrite([], { answer: () => ({ path: "/f", size: 3n, sha256: sha256(utf8("data")) }) }),
    });
    await rejectsWith(short.writeFile("sb-1", "/f", "data"), "DATA_LOSS");
  });
});

describe("readFile against an in-memory server", () => {
  test("yields the data, then sets end; readFileBytes collects it; offset and length are sent", async () => {
    const data = pattern(200_000);
    const requests: { offset: bigint; length: bigint }[] = [];
    const forkd = serve({
      async *readFile(req, ctx) {
        requests.push({ offset: req.offset, length: req.length });
        yield* sending(data, { fileSize: 1_000_000n })(req, ctx);
      },
    });
    const download = forkd.readFile("sb-1", "/data.bin", { offset: 5, length: 200_000n });
    const chunks: Uint8Array[] = [];
    for await (const chunk of download) {
      assert.equal(download.end, undefined, "end is set only after the check");
      chunks.push(chunk);
    }
    assert.deepEqual(
      chunks.map((c) => c.length),
      [65536, 65536, 65536, 3392],
    );
    assert.deepEqual(concat(chunks), data);
    assert.equal(download.end?.size, 200_000n);
    assert.equal(download.end?.sha256, sha256(data));
    assert.equal(download.end?.fileSize, 1_000_000n);
    assert.deepEqual(requests, [{ offset: 5n, length: 200_000n }]);

    assert.deepEqual(await forkd.readFileBytes("sb-1", "/data.bin"), data);
  });

  test("an empty file is one end message", async () => {
    const forkd = serve({ readFile: sending(new Uint8Array(0)) });
    assert.deepEqual(await forkd.readFileBytes("sb-1", "/empty"), new Uint8Array(0));
  });

  test("a SHA-256 mismatch is DATA_LOSS, after the last chunk", async () => {
    const data = pattern(100_000);
    const forkd = serve({ readFile: sending(data, { sha256: "ab".repeat(32) }) });
    const download = forkd.readFile("sb-1", "/f");
    let got = 0;
    const err = await rejectsWith(
      (async () => {
        for await (const chunk of download) got += chunk.length;
      })(),
      "DATA_LOSS",
    );
    assert.equal(got, data.length, "every chunk was yielded before the check");
    assert.equal(err.code, Code.DataLoss);
    assert.match(err.message, /ReadFile \/f: received 100000 bytes with SHA-256 [0-9a-f]{64}, but the guest sent 100000 bytes with SHA-256 (ab){32}/);
    assert.equal(download.end, undefined);
    await rejectsWith(forkd.readFileBytes("sb-1", "/f"), "DATA_LOSS");
  });

  test("a size mismatch is DATA_LOSS", async () => {
    const forkd = serve({ readFile: sending(pattern(1000), { size: 1001n }) });
    await rejectsWith(forkd.readFileBytes("sb-1", "/f"), "DATA_LOSS");
  });

  test("a stream that ends without its end message is DATA_LOSS", async () => {
    const forkd = serve({ readFile: sending(pattern(70_000), null) });
    const err = await rejectsWith(forkd.readFileBytes("sb-1", "/f"), "DATA_LOSS");
    assert.match(err.message, /ended after 70000 bytes without its end message/);
  });

  test("a message after the end message is DATA_LOSS", async () => {
    const forkd = serve({ readFile: sending(pattern(10), {}, [{ case: "data", value: pattern(1) }]) });
    const err = await rejectsWith(forkd.readFileBytes("sb-1", "/f"), "DATA_LOSS");
    assert.match(err.message, /after the end message/);
  });

  test("daemon errors map to ForkdError codes, before or during the stream", async () => {
    const refuse = (code: Code): Impl => ({
      async *readFile() {
        throw new ConnectError("refused", code);
      },
    });
    await rejectsWith(serve(refuse(Code.FailedPrecondition)).readFileBytes("sb-1", "/f"), "FAILED_PRECONDITION");
    await rejectsWith(serve(refuse(Code.NotFound)).readFileBytes("sb-1", "/f"), "NOT_FOUND");
    const cut = serve({
      async *readFile() {
        yield { event: { case: "data", value: pattern(10) } };
        throw new ConnectError("sandbox stopped", Code.Unavailable);
      },
    });
    await rejectsWith(cut.readFileBytes("sb-1", "/f"), "UNAVAILABLE");
  });

  test("breaking out of the loop cancels the call", async () => {
    let aborted: Promise<void> | undefined;
    const forkd = serve({
      async *readFile(_req, ctx) {
        aborted = new Promise((resolve) => ctx.signal.addEventListener("abort", () => resolve()));
        for (let i = 0; ; i++) {
          yield { event: { case: "data", value: pattern(1024, i) } };
        }
      },
    });
    for await (const _ of forkd.readFile("sb-1", "/dev/zero-like")) {
      break;
    }
    await aborted;
  });

  test("bad arguments throw when called", () => {
    const forkd = serve({});
    assert.throws(() => forkd.readFile("sb-1", 1 as unknown as string), TypeError);
    assert.throws(() => forkd.readFile("sb-1", "/f", { offset: -5 }), RangeError);
  });
});

describe("readFileTo", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "forkd-ts-readfileto-"));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test("writes the file and resolves with the end message; no temporary file is left", async () => {
    const data = pattern(300_000);
    const forkd = serve({ readFile: sending(data) });
    const dest = join(dir, "ok.bin");
    const end = await forkd.readFileTo("sb-1", "/ok.bin", dest);
    assert.deepEqual(new Uint8Array(await readFile(dest)), data);
    assert.equal(end.size, 300_000n);
    assert.equal(end.sha256, sha256(data));
    assert.equal(end.fileSize, 300_000n);
    assert.deepEqual(await readdir(dir), ["ok.bin"]);
  });

  test("a bad download leaves the old file untouched and removes the temporary file", async () => {
    const dest = join(dir, "keep.txt");
    await writeFile(dest, "old content");
    const cases: [Impl, string][] = [
      [{ readFile: sending(pattern(150_000), { sha256: "00".repeat(32) }) }, "DATA_LOSS"],
      [{ readFile: sending(pattern(150_000), null) }, "DATA_LOSS"],
      [
        {
          async *readFile() {
            yield { event: { case: "data", value: pattern(70_000) } };
            throw new ConnectError("sandbox stopped", Code.Unavailable);
          },
        },
        "UNAVAILABLE",
      ],
      [
        {
          async *readFile() {
            throw new ConnectError("not a Linux sandbox", Code.FailedPrecondition);
          },
        },
        "FAILED_PRECONDITION",
      ],
    ];
    for (const [impl, codeName] of cases) {
      await rejectsWith(serve(impl).readFileTo("sb-1", "/f", dest), codeName);
      assert.equal(await readFile(dest, "utf8"), "old content", codeName);
      assert.deepEqual((await readdir(dir)).sort(), ["keep.txt", "ok.bin"], `${codeName}: temp left`);
    }
  });

  test("a local error is Node's own, before any call", async () => {
    let calls = 0;
    const forkd = serve({
      async *readFile(req, ctx) {
        calls++;
        yield* sending(pattern(10))(req, ctx);
      },
    });
    await assert.rejects(forkd.readFileTo("sb-1", "/f", join(dir, "missing-dir", "f")), { code: "ENOENT" });
    assert.equal(calls, 0);
  });
});

describe("statFile, listDir, removeFile against an in-memory server", () => {
  const modifyTime = timestampFromDate(new Date("2026-01-02T03:04:05Z"));
  const forkd = serve({
    statFile(req) {
      if (req.path === "/missing") {
        throw new ConnectError("/missing: no such file", Code.NotFound);
      }
      if (req.sandboxId === "sb-ref") {
        throw new ConnectError("sandbox sb-ref runs the reference guest", Code.FailedPrecondition);
      }
      return {
        info: { name: req.path.split("/").pop() || "/", size: 42n, mode: 0o640, type: FileType.FILE, modifyTime },
      };
    },
    listDir(req) {
      if (req.path === "/etc/passwd") {
        throw new ConnectError("not a directory", Code.FailedPrecondition);
      }
      return {
        entries: [
          { name: "a", size: 1n, mode: 0o644, type: FileType.FILE },
          { name: "b", size: 4096n, mode: 0o755, type: FileType.DIRECTORY },
          { name: "c", size: 1n, mode: 0o777, type: FileType.SYMLINK },
        ],
        truncated: req.path === "/big",
      };
    },
    removeFile(req) {
      if (req.path === "/") {
        throw new ConnectError("cannot remove /", Code.InvalidArgument);
      }
      if (req.path === "/full" && !req.recursive) {
        throw new ConnectError("directory not empty", Code.FailedPrecondition);
      }
      return {};
    },
  });

  test("statFile returns the FileInfo", async () => {
    const info = await forkd.statFile("sb-1", "/etc/hosts");
    assert.equal(info.name, "hosts");
    assert.equal(info.size, 42n);
    assert.equal(info.mode, 0o640);
    assert.equal(info.type, FileType.FILE);
    assert.deepEqual(info.modifyTime, modifyTime);
    await rejectsWith(forkd.statFile("sb-1", "/missing"), "NOT_FOUND");
    await rejectsWith(forkd.statFile("sb-ref", "/etc"), "FAILED_PRECONDITION");
  });

  test("statFile without info in the response is INTERNAL", async () => {
    await rejectsWith(serve({ statFile: () => ({}) }).statFile("sb-1", "/x"), "INTERNAL");
  });

  test("listDir returns entries and truncated", async () => {
    const { entries, truncated } = await forkd.listDir("sb-1", "/srv");
    assert.deepEqual(
      entries.map((e) => [e.name, FileType[e.type]]),
      [
        ["a", "FILE"],
        ["b", "DIRECTORY"],
        ["c", "SYMLINK"],
      ],
    );
    assert.equal(truncated, false);
    assert.equal((await forkd.listDir("sb-1", "/big")).truncated, true);
    await rejectsWith(forkd.listDir("sb-1", "/etc/passwd"), "FAILED_PRECONDITION");
  });

  test("removeFile sends recursive and resolves with nothing", async () => {
    assert.equal(await forkd.removeFile("sb-1", "/tmp/x"), undefined);
    await rejectsWith(forkd.removeFile("sb-1", "/full"), "FAILED_PRECONDITION");
    await forkd.removeFile("sb-1", "/full", { recursive: true });
    await rejectsWith(forkd.removeFile("sb-1", "/"), "INVALID_ARGUMENT");
  });

  test("a closed controller rejects with CANCELLED", async () => {
    const c = serve({});
    c.close();
    await rejectsWith(c.statFile("sb-1", "/"), "CANCELLED");
    await rejectsWith(c.readFileBytes("sb-1", "/f"), "CANCELLED");
    const err = await rejectsWith(c.listDir("sb-1", "/"), "CANCELLED");
    assert.ok(err instanceof ForkdError);
  });
});

describe("over HTTP/2 against a stand-in server", () => {
  test("a large upload reads its source only a little ahead of the server", async () => {
    let pulled = 0;
    let maxLead = 0;
    const server = await startFileServer({
      onData: async (upload) => {
        maxLead = Math.max(maxLead, pulled - upload.chunkSizes.length);
        await new Promise((resolve) => setTimeout(resolve, 2)); // a slow guest
      },
    });
    const forkd = new Controller({ target: server.target });
    try {
      const n = 48;
      const hash = createHash("sha256");
      async function* source(): AsyncGenerator<Uint8Array> {
        for (let i = 0; i < n; i++) {
          pulled++;
          const chunk = pattern(MiB, i);
          hash.update(chunk);
          yield chunk;
        }
      }
      const res = await forkd.writeFile("sb-1", "/big.bin", source());
      assert.equal(res.size, BigInt(n * MiB));
      assert.equal(res.sha256, hash.digest("hex"));
      assert.equal(server.uploads[0]?.completed, true);
      // HTTP/2 flow control lets a few MiB be in flight; the rest waits for the server.
      assert.ok(maxLead <= 8, `the source ran ${maxLead} MiB ahead of the server`);

      const back = forkd.readFile("sb-1", "/big.bin");
      let size = 0;
      for await (const chunk of back) size += chunk.length;
      assert.equal(size, n * MiB);
      assert.equal(back.end?.sha256, res.sha256);
    } finally {
      forkd.close();
      await server.close();
    }
  });

  test("a failing source leaves nothing under the path: RST_STREAM, never END_STREAM", async () => {
    const server = await startFileServer();
    const proxy = await startWireProxy(server.target);
    const forkd = new Controller({ target: proxy.target });
    try {
      async function* source(): AsyncGenerator<Uint8Array> {
        yield pattern(MiB);
        yield pattern(MiB, 1);
        throw new Error("read error");
      }
      await assert.rejects(forkd.writeFile("sb-1", "/cut.bin", source()), { message: "read error" });
      const deadline = Date.now() + 5000;
      while (server.uploads[0]?.error === undefined && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.equal(server.uploads[0]?.completed, false);
      assert.ok(server.uploads[0]?.error !== undefined, "the server saw the upload fail");
      assert.deepEqual(await readdir(server.root), []);
      // Node's Http2Stream.close() would half-close first: a daemon reading
      // the END_STREAM before the reset would take the upload as complete.
      const frames = proxy.frames().filter((f) => f.streamId !== 0);
      const ends = frames.filter(
        (f) => (f.type === H2.DATA || f.type === H2.HEADERS) && (f.flags & H2.END_STREAM) !== 0,
      );
      assert.deepEqual(ends, [], "no END_STREAM on the upload");
      const resets = frames.filter((f) => f.type === H2.RST_STREAM);
      assert.deepEqual(
        resets.map((f) => f.errorCode),
        [H2.CANCEL],
      );
    } finally {
      forkd.close();
      await proxy.close();
      await server.close();
    }
  });
});
