/**
 * A stand-in for the daemon's file calls over real gRPC (HTTP/2 on a
 * loopback port, Connect's Node server): WriteFile and ReadFile on a local
 * directory that plays the guest's root, streaming both ways as the daemon
 * does (an upload goes to a temporary file renamed over the path when the
 * client half-closes; a download is sent in 64 KiB chunks, then the end
 * message with the size and SHA-256). For the client's streaming and the
 * examples, without a Linux guest.
 */
import { createHash } from "node:crypto";
import { once } from "node:events";
import { createReadStream } from "node:fs";
import { mkdir, mkdtemp, open, rename, rm, stat } from "node:fs/promises";
import { type Http2Session, createServer } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { SandboxService } from "../../src/index.js";

/** One upload as the server saw it. */
export interface ServedUpload {
  readonly path: string;
  /** Sizes of the data messages, in order. */
  readonly chunkSizes: number[];
  /** Whether the client half-closed (the file was renamed into place). */
  completed: boolean;
  /** Why it was not, when it was not. */
  error?: unknown;
}

/** A running stand-in. */
export interface FileServer {
  /** `"127.0.0.1:PORT"`. */
  readonly target: string;
  /** The directory guest paths are resolved in (`/a/b` is `root/a/b`). */
  readonly root: string;
  /** Uploads so far. */
  readonly uploads: ServedUpload[];
  /** Stops the server, drops its connections, removes `root`. */
  close(): Promise<void>;
}

const READ_CHUNK = 64 * 1024;

/**
 * Starts the stand-in. `onData` runs for every data message received (after
 * it was written), and may delay the next read, as a slow guest would.
 */
export async function startFileServer(
  options: { onData?: (upload: ServedUpload) => Promise<void> | void } = {},
): Promise<FileServer> {
  const root = await mkdtemp(join(tmpdir(), "forkd-ts-files-"));
  const uploads: ServedUpload[] = [];
  const guestPath = (path: string): string => {
    if (!path.startsWith("/") || path.includes("\0")) {
      throw new ConnectError(`bad path ${JSON.stringify(path)}`, Code.InvalidArgument);
    }
    return join(root, path);
  };
  const handler = connectNodeAdapter({
    routes(router) {
      router.service(SandboxService, {
        async writeFile(requests) {
          const it = requests[Symbol.asyncIterator]();
          const first = await it.next();
          if (first.done === true || first.value.content.case !== "header") {
            throw new ConnectError("the first message must be a header", Code.InvalidArgument);
          }
          const header = first.value.content.value;
          const dest = guestPath(header.path);
          if (header.makeParents) {
            await mkdir(dirname(dest), { recursive: true });
          } else if (!(await stat(dirname(dest)).catch(() => undefined))?.isDirectory()) {
            throw new ConnectError(`no directory for ${header.path}`, Code.NotFound);
          }
          const tmp = `${dest}.upload-tmp`;
          const upload: ServedUpload = { path: header.path, chunkSizes: [], completed: false };
          uploads.push(upload);
          const file = await open(tmp, "w", header.mode || 0o644);
          const hash = createHash("sha256");
          let size = 0;
          try {
            for (;;) {
              const next = await it.next();
              if (next.done === true) {
                break;
              }
              if (next.value.content.case !== "data") {
                throw new ConnectError("a second header", Code.InvalidArgument);
              }
              const data = next.value.content.value;
              upload.chunkSizes.push(data.length);
              await file.write(data);
              hash.update(data);
              size += data.length;
              await options.onData?.(upload);
            }
            await file.close();
            await rename(tmp, dest);
            upload.completed = true;
          } catch (err) {
            await file.close().catch(() => undefined);
            await rm(tmp, { force: true });
            upload.error = err;
            throw err;
          }
          return { path: header.path, size: BigInt(size), sha256: hash.digest("hex") };
        },
        async *readFile(req) {
          const src = guestPath(req.path);
          const info = await stat(src).catch(() => {
            throw new ConnectError(`${req.path} not found`, Code.NotFound);
          });
          if (!info.isFile()) {
            throw new ConnectError(`${req.path} is not a regular file`, Code.FailedPrecondition);
          }
          const start = Number(req.offset);
          const end = req.length === 0n ? Infinity : start + Number(req.length) - 1;
          const hash = createHash("sha256");
          let size = 0;
          if (start < info.size) {
            const stream = createReadStream(src, { start, end, highWaterMark: READ_CHUNK });
            for await (const chunk of stream as AsyncIterable<Buffer>) {
              hash.update(chunk);
              size += chunk.length;
              yield { event: { case: "data", value: chunk } };
            }
          }
          yield {
            event: {
              case: "end",
              value: { size: BigInt(size), sha256: hash.digest("hex"), fileSize: BigInt(info.size) },
            },
          };
        },
      });
    },
  });
  const server = createServer(handler);
  const sessions = new Set<Http2Session>();
  server.on("session", (s: Http2Session) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  return {
    target: `127.0.0.1:${port}`,
    root,
    uploads,
    close: async () => {
      for (const s of sessions) {
        s.destroy();
      }
      server.close();
      await once(server, "close");
      await rm(root, { recursive: true, force: true });
    },
  };
}
