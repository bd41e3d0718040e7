import {
  type CallOptions,
  type Client,
  Code,
  ConnectError,
  type Interceptor,
  type Transport,
  createClient,
} from "@connectrpc/connect";
import type { Http2SessionManager } from "@connectrpc/connect-node";
import { ForkdError, toForkdError } from "./errors.js";
import { type ExecEvent, type ExecResult, collectExec, toExecEvent } from "./exec.js";
import {
  FileDownload,
  type FileSource,
  Upload,
  collectDownload,
  downloadTo,
} from "./files.js";
import {
  type ExecRequest,
  type FileInfo,
  type ListDirResponse,
  type ReadConsoleResponse,
  type Sandbox,
  SandboxService,
} from "./gen/forkd/v1/sandbox_pb.js";
import {
  type Snapshot,
  SnapshotService,
  type WatchSnapshotResponse,
} from "./gen/forkd/v1/snapshot_pb.js";
import {
  type BranchOptions,
  type CreateSnapshotOptions,
  type DeleteSnapshotOptions,
  type ExecOptions,
  type ListSandboxesOptions,
  type ListSnapshotsOptions,
  type ReadConsoleOptions,
  type ReadFileOptions,
  type RemoveFileOptions,
  type SpawnOptions,
  type WriteFileOptions,
  branchSandboxRequest,
  createSnapshotRequest,
  deleteSnapshotRequest,
  execRequest,
  listDirRequest,
  listSandboxesRequest,
  listSnapshotsRequest,
  readConsoleRequest,
  readFileRequest,
  removeFileRequest,
  setSandboxTtlRequest,
  spawnSandboxesRequest,
  statFileRequest,
  uploadChunkSize,
  writeFileHeader,
} from "./requests.js";
import {
  type BranchResult,
  type CreateSnapshotResult,
  type ReadFileResult,
  SpawnResult,
  type WriteFileResult,
  withSnapshotTag,
} from "./results.js";
import { DEFAULT_TARGET, bearerAuth, createOwnedTransport, targetToBaseUrl } from "./transport.js";

/** Options of the {@link Controller} constructor. */
export interface ControllerOptions {
  /**
   * The daemon: `"host:port"` (plain HTTP/2, as `forkd serve` listens) or a
   * full `http://` / `https://` URL. Default `"127.0.0.1:50051"`.
   */
  target?: string | undefined;
  /** Bearer token, sent as `authorization: Bearer <token>` on every call. */
  token?: string | undefined;
  /**
   * A ready-made Connect transport to use instead of connecting to `target`.
   * Excludes `target`, `token` and `interceptors`: configure those on the
   * transport (see {@link bearerAuth}). A gRPC transport of
   * `@connectrpc/connect-node` should be given a
   * {@link ResettingSessionManager}: with Connect's own, a cancelled
   * `writeFile` half-closes its stream before resetting it.
   */
  transport?: Transport | undefined;
  /** Extra Connect interceptors; they run inside the one that adds the token. */
  interceptors?: readonly Interceptor[] | undefined;
  /** Deadline of every call, streams included, in milliseconds. Default none. */
  timeoutMs?: number | undefined;
}

/**
 * A client of one forkd daemon: sandboxes, snapshots and commands.
 *
 * Every method rejects with a {@link ForkdError} carrying the gRPC status
 * (streams throw it from the iterator). Arguments that cannot be encoded (a
 * wrong type, a mode outside `BranchMode`) reject with a TypeError or
 * RangeError before anything is sent (the streaming methods throw them when
 * called). Two exceptions: `writeFile` rejects with its source's own error
 * when the source fails, and `readFileTo` with Node's errors for the local
 * file.
 *
 * Call {@link Controller.close} (or use `await using`) when done to release
 * the HTTP/2 connection. An idle connection does not keep Node running.
 */
export class Controller implements AsyncDisposable {
  readonly #sandboxes: Client<typeof SandboxService>;
  readonly #snapshots: Client<typeof SnapshotService>;
  readonly #session: Http2SessionManager | undefined;
  readonly #callOptions: CallOptions;
  #closed = false;

  constructor(options: ControllerOptions = {}) {
    const { target, token, transport, interceptors = [], timeoutMs } = options;
    if (token !== undefined && (typeof token !== "string" || token === "")) {
      throw new TypeError("token must be a non-empty string");
    }
    if (timeoutMs !== undefined && !(Number.isFinite(timeoutMs) && timeoutMs > 0)) {
      throw new RangeError(`timeoutMs must be a positive number; got ${String(timeoutMs)}`);
    }
    let t: Transport;
    if (transport !== undefined) {
      if (target !== undefined || token !== undefined || interceptors.length > 0) {
        throw new TypeError(
          "transport excludes target, token and interceptors; configure them on the transport",
        );
      }
      t = transport;
    } else {
      const auth = token === undefined ? [] : [bearerAuth(token)];
      const owned = createOwnedTransport(targetToBaseUrl(target ?? DEFAULT_TARGET), [
        ...auth,
        ...interceptors,
      ]);
      t = owned.transport;
      this.#session = owned.session;
    }
    this.#sandboxes = createClient(SandboxService, t);
    this.#snapshots = createClient(SnapshotService, t);
    this.#callOptions = timeoutMs === undefined ? {} : { timeoutMs };
  }

  /**
   * Starts `n` sandboxes: cold boots when `tag` is empty or absent (of the
   * reference guest, or of the Linux image `image`), else children forked
   * from snapshot `tag`. A Linux image needs a host with Intel VMX or AMD
   * SVM (elsewhere FAILED_PRECONDITION). Resolves with a {@link SpawnResult}:
   * an array of the started sandboxes (`res[0]`, `res.length`, `for (const
   * sb of res)`) that is also the whole response, with the per-sandbox
   * `failures`, `elapsedMs` and `sandboxes` alongside (the call fails only
   * when none started).
   */
  async spawnSandboxes(opts: SpawnOptions = {}): Promise<SpawnResult> {
    const req = spawnSandboxesRequest(opts);
    const res = await this.#unary(() => this.#sandboxes.spawnSandboxes(req, this.#callOptions));
    return new SpawnResult(res);
  }

  /** Returns one sandbox by id. */
  async getSandbox(id: string): Promise<Sandbox> {
    const res = await this.#unary(() => this.#sandboxes.getSandbox({ id }, this.#callOptions));
    return required(res.sandbox, "sandbox");
  }

  /** Lists the sandboxes, oldest first, optionally only those matching `labels`. */
  async listSandboxes(opts: ListSandboxesOptions = {}): Promise<Sandbox[]> {
    const req = listSandboxesRequest(opts);
    const res = await this.#unary(() => this.#sandboxes.listSandboxes(req, this.#callOptions));
    return res.sandboxes;
  }

  /** Stops and removes a sandbox; resolves with it as it was just before. */
  async deleteSandbox(id: string): Promise<Sandbox> {
    const res = await this.#unary(() => this.#sandboxes.deleteSandbox({ id }, this.#callOptions));
    return required(res.sandbox, "sandbox");
  }

  /**
   * Runs a command in a sandbox and collects its output. A non-zero exit
   * code is a result, not an error, and so is death by a signal (`signal`
   * set, `exitCode` 128 + signal); `timeoutMs` overrunning is
   * DEADLINE_EXCEEDED. `env`, `cwd` and `stdin` apply to Linux sandboxes
   * only (the reference guest refuses them with FAILED_PRECONDITION).
   */
  async exec(
    sandboxId: string,
    argv: readonly string[],
    opts: ExecOptions = {},
  ): Promise<ExecResult> {
    const events = this.#execEvents(execRequest(sandboxId, argv, opts));
    return this.#unary(() => collectExec(events));
  }

  /**
   * Runs a command in a sandbox and streams its output as it is produced:
   * `stdout`/`stderr` chunks, then one `exit` event. Breaking out of the
   * loop cancels the call.
   */
  execStream(
    sandboxId: string,
    argv: readonly string[],
    opts: ExecOptions = {},
  ): AsyncIterable<ExecEvent> {
    return this.#execEvents(execRequest(sandboxId, argv, opts));
  }

  /**
   * Captures a running sandbox as a new snapshot. `mode` wins over the
   * legacy `diff` flag (only `mode` is sent); `wait: false` (LIVE only)
   * resolves while the snapshot is still WRITING, see
   * {@link Controller.watchSnapshot}. Resolves with the response plus
   * `tag`, the new snapshot's tag.
   */
  async branchSandbox(sandboxId: string, opts: BranchOptions = {}): Promise<BranchResult> {
    const req = branchSandboxRequest(sandboxId, opts);
    const res = await this.#unary(() => this.#sandboxes.branchSandbox(req, this.#callOptions));
    return withSnapshotTag(res);
  }

  /**
   * Sets a sandbox's lifetime to `ttlSeconds` from now, or clears it with 0
   * (it then lives until {@link Controller.deleteSandbox}); resolves with
   * the sandbox and its new `expireTime` (absent when cleared). Above the
   * daemon's `--max-ttl` is INVALID_ARGUMENT, an unknown sandbox NOT_FOUND,
   * one being deleted or stopped FAILED_PRECONDITION.
   */
  async setSandboxTtl(sandboxId: string, ttlSeconds: number | bigint): Promise<Sandbox> {
    const req = setSandboxTtlRequest(sandboxId, ttlSeconds);
    const res = await this.#unary(() => this.#sandboxes.setSandboxTtl(req, this.#callOptions));
    return required(res.sandbox, "sandbox");
  }

  /**
   * Returns the end of a Linux sandbox's serial console log (kernel
   * messages, early userland output) as `data` bytes, with `truncated` set
   * when older output was cut off. `tailBytes` (at most 1 MiB) defaults to
   * the server's 64 KiB. A reference-guest sandbox has no serial console:
   * FAILED_PRECONDITION.
   */
  async readConsole(sandboxId: string, opts: ReadConsoleOptions = {}): Promise<ReadConsoleResponse> {
    const req = readConsoleRequest(sandboxId, opts);
    return this.#unary(() => this.#sandboxes.readConsole(req, this.#callOptions));
  }

  /**
   * Uploads a file into a Linux sandbox, creating or replacing `path` (an
   * absolute guest path). `source` is the file's content: a `Uint8Array`,
   * a `string` (uploaded as its UTF-8 encoding), or an iterable or async
   * iterable of `Uint8Array` chunks, such as `fs.createReadStream(local)`
   * (Node streams are async iterables of `Buffer`s).
   *
   * The source is read only as fast as the upload goes, in data messages
   * of `chunkSize` bytes (default 1 MiB, at most 3 MiB), so memory stays
   * bounded whatever the file's size. The guest writes to a temporary file
   * and renames it over `path` only when the whole source has been sent:
   * a failed upload leaves `path` as it was. Resolves with the guest's
   * `path`, `size` (a `bigint`) and `sha256` (lowercase hex), once they
   * have been checked against what was sent (a difference rejects with
   * DATA_LOSS).
   *
   * Errors from the daemon reject with a {@link ForkdError}: a missing
   * parent directory (without `makeParents`) NOT_FOUND, `path` taken with
   * `noOverwrite` ALREADY_EXISTS, `path` a directory or a reference-guest
   * sandbox FAILED_PRECONDITION, a full guest disk RESOURCE_EXHAUSTED, a
   * bad path INVALID_ARGUMENT. When the source itself fails (a read error,
   * a chunk that is not a `Uint8Array`), the call is cancelled, so nothing
   * is written, and the promise rejects with the source's own error.
   *
   * @example
   * ```ts
   * import { createReadStream } from "node:fs";
   * const res = await forkd.writeFile(sb.id, "/srv/data.bin", createReadStream("data.bin"));
   * await forkd.writeFile(sb.id, "/etc/motd", "hello\n", { mode: 0o644 });
   * ```
   */
  async writeFile(
    sandboxId: string,
    path: string,
    source: FileSource,
    opts: WriteFileOptions = {},
  ): Promise<WriteFileResult> {
    const upload = new Upload(source, uploadChunkSize(opts), writeFileHeader(sandboxId, path, opts));
    try {
      this.#checkOpen();
      const abort = new AbortController();
      const messages = upload.messages(() => abort.abort());
      let res: WriteFileResult;
      try {
        res = await this.#sandboxes.writeFile(messages, {
          ...this.#callOptions,
          signal: abort.signal,
        });
      } catch (err) {
        const failed = upload.sourceError;
        throw failed === undefined ? toForkdError(err) : failed.error;
      }
      upload.verify(res);
      return res;
    } finally {
      upload.close();
    }
  }

  /**
   * Downloads a file (or the part of it from `offset`, at most `length`
   * bytes) from a Linux sandbox, as a stream of chunks of at most 64 KiB.
   * The guest sends only as fast as they are consumed. The size and
   * SHA-256 of the bytes received are checked against the stream's end
   * message when it ends: a mismatch, or a stream cut short without one,
   * throws a {@link ForkdError} DATA_LOSS from the loop after the last
   * chunk, so treat the data as checked only once the loop has finished.
   * Then the returned {@link FileDownload}'s `end` holds the end message
   * (`size`, `sha256`, and `fileSize`, the file's size when opened).
   * Breaking out of the loop cancels the call.
   *
   * A missing file is NOT_FOUND; a directory or device, or a
   * reference-guest sandbox, FAILED_PRECONDITION; a bad path
   * INVALID_ARGUMENT. Arguments that cannot be encoded throw when called.
   *
   * @example
   * ```ts
   * import { createWriteStream } from "node:fs";
   * import { pipeline } from "node:stream/promises";
   * const download = forkd.readFile(sb.id, "/var/log/app.log");
   * await pipeline(download, createWriteStream("app.log"));   // see also readFileTo
   * console.log(download.end?.size, download.end?.sha256);
   * ```
   */
  readFile(sandboxId: string, path: string, opts: ReadFileOptions = {}): FileDownload {
    const req = readFileRequest(sandboxId, path, opts);
    return new FileDownload(
      this.#stream((options) => this.#sandboxes.readFile(req, options)),
      req.path,
    );
  }

  /**
   * {@link Controller.readFile} collected into one `Uint8Array`, after it
   * has been checked. Meant for small files: the whole file is held in
   * memory.
   */
  async readFileBytes(
    sandboxId: string,
    path: string,
    opts: ReadFileOptions = {},
  ): Promise<Uint8Array> {
    const download = this.readFile(sandboxId, path, opts);
    return this.#unary(() => collectDownload(download));
  }

  /**
   * Downloads a file of a Linux sandbox into the local file `localPath`,
   * atomically: the bytes go to a temporary file in the same directory,
   * which is renamed over `localPath` only once the download has been
   * checked (see {@link Controller.readFile}) and flushed to disk. On any
   * error the temporary file is removed and `localPath` is left as it was.
   * Resolves with the end message: `size` and `sha256` of the bytes
   * written, and `fileSize`, the guest file's size when opened. Local
   * file errors reject with Node's own errors (`code` `"ENOENT"`, ...).
   */
  async readFileTo(
    sandboxId: string,
    path: string,
    localPath: string,
    opts: ReadFileOptions = {},
  ): Promise<ReadFileResult> {
    const download = this.readFile(sandboxId, path, opts);
    if (typeof localPath !== "string" || localPath === "") {
      throw new TypeError("localPath must be a non-empty string");
    }
    return downloadTo(download, localPath);
  }

  /**
   * Describes one path of a Linux sandbox as `lstat` does (a symlink is
   * described, not followed): `name`, `size`, `mode` (permission bits),
   * `type` (a {@link FileType}) and `modifyTime`. A missing path is
   * NOT_FOUND.
   */
  async statFile(sandboxId: string, path: string): Promise<FileInfo> {
    const req = statFileRequest(sandboxId, path);
    const res = await this.#unary(() => this.#sandboxes.statFile(req, this.#callOptions));
    return required(res.info, "info");
  }

  /**
   * Lists a directory of a Linux sandbox (a symlink to one is followed):
   * `entries`, sorted by name without `.` and `..`, each a `FileInfo`, and
   * `truncated`, set when entries were left out (at most 4096 are listed).
   * A missing directory is NOT_FOUND, a path that is not one
   * FAILED_PRECONDITION.
   */
  async listDir(sandboxId: string, path: string): Promise<ListDirResponse> {
    const req = listDirRequest(sandboxId, path);
    return this.#unary(() => this.#sandboxes.listDir(req, this.#callOptions));
  }

  /**
   * Removes a file, symlink or empty directory of a Linux sandbox; with
   * `recursive`, a directory and everything in it. A missing path is
   * NOT_FOUND, a non-empty directory without `recursive`
   * FAILED_PRECONDITION, `/` INVALID_ARGUMENT.
   */
  async removeFile(sandboxId: string, path: string, opts: RemoveFileOptions = {}): Promise<void> {
    const req = removeFileRequest(sandboxId, path, opts);
    await this.#unary(() => this.#sandboxes.removeFile(req, this.#callOptions));
  }

  /**
   * Boots a sandbox (of the reference guest, or of the Linux image `image`),
   * runs the warm-up commands in it, and snapshots it. Children spawned
   * from the snapshot run the same guest. Resolves with the response plus
   * `tag`, the snapshot's tag.
   */
  async createSnapshot(opts: CreateSnapshotOptions = {}): Promise<CreateSnapshotResult> {
    const req = createSnapshotRequest(opts);
    const res = await this.#unary(() => this.#snapshots.createSnapshot(req, this.#callOptions));
    return withSnapshotTag(res);
  }

  /** Returns one snapshot by tag. */
  async getSnapshot(tag: string): Promise<Snapshot> {
    const res = await this.#unary(() => this.#snapshots.getSnapshot({ tag }, this.#callOptions));
    return required(res.snapshot, "snapshot");
  }

  /** Lists the snapshots, oldest first, optionally only those with `status`. */
  async listSnapshots(opts: ListSnapshotsOptions = {}): Promise<Snapshot[]> {
    const req = listSnapshotsRequest(opts);
    const res = await this.#unary(() => this.#snapshots.listSnapshots(req, this.#callOptions));
    return res.snapshots;
  }

  /**
   * Deletes a snapshot; resolves with the removed tags, this one last. The
   * server refuses (FAILED_PRECONDITION) to orphan dependents or running
   * children unless `cascade` or `force`.
   */
  async deleteSnapshot(tag: string, opts: DeleteSnapshotOptions = {}): Promise<string[]> {
    const req = deleteSnapshotRequest(tag, opts);
    const res = await this.#unary(() => this.#snapshots.deleteSnapshot(req, this.#callOptions));
    return res.deletedTags;
  }

  /**
   * Follows a snapshot's status: the current one at once, progress while it
   * is WRITING, then READY or FAILED, after which the iteration ends.
   * Breaking out of the loop cancels the call.
   */
  watchSnapshot(tag: string): AsyncIterable<WatchSnapshotResponse> {
    if (typeof tag !== "string") {
      throw new TypeError(`tag must be a string; got ${typeof tag}`);
    }
    return this.#stream((options) => this.#snapshots.watchSnapshot({ tag }, options));
  }

  /**
   * Closes the HTTP/2 connection this controller opened, cancelling calls
   * in flight. Later calls reject with CANCELLED. A transport passed in
   * the options is left alone.
   */
  close(): void {
    this.#closed = true;
    this.#session?.abort();
  }

  /** {@link Controller.close}, for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  async #unary<T>(call: () => Promise<T>): Promise<T> {
    this.#checkOpen();
    try {
      return await call();
    } catch (err) {
      throw toForkdError(err);
    }
  }

  /**
   * Runs a server stream. Connect's response iterable has no `return()`, so
   * a consumer leaving the loop early would leave the HTTP/2 stream open
   * (and the daemon blocked on flow control); the abort in `finally`
   * cancels the call instead.
   */
  async *#stream<T>(
    open: (options: CallOptions) => AsyncIterable<T>,
  ): AsyncGenerator<T, void, undefined> {
    this.#checkOpen();
    const abort = new AbortController();
    let done = false;
    try {
      yield* open({ ...this.#callOptions, signal: abort.signal });
      done = true;
    } catch (err) {
      done = true;
      throw toForkdError(err);
    } finally {
      if (!done) {
        abort.abort();
      }
    }
  }

  async *#execEvents(req: ExecRequest): AsyncGenerator<ExecEvent, void, undefined> {
    for await (const msg of this.#stream((options) => this.#sandboxes.exec(req, options))) {
      const ev = toExecEvent(msg);
      if (ev !== undefined) {
        yield ev;
      }
    }
  }

  #checkOpen(): void {
    if (this.#closed) {
      throw new ForkdError(new ConnectError("controller is closed", Code.Canceled));
    }
  }
}

function required<T>(value: T | undefined, field: string): T {
  if (value === undefined) {
    throw new ForkdError(new ConnectError(`response has no ${field}`, Code.Internal));
  }
  return value;
}
