/**
 * Request builders: the one place that maps the Controller's options onto
 * request messages, and so the one place the compatibility rules live.
 *
 * - `mode` wins over the legacy `diff` flag: when `mode` is given only `mode`
 *   is sent; `diff: true` alone is sent as the legacy `diff` field.
 * - `wait` is on the wire only when it is `false` (proto3 `optional`: absent
 *   means true).
 * - `live_fork` is on the wire only when `liveFork` is `true`.
 * - What only Linux guests use (`image`; Exec's `env`, `cwd`, `stdin`) is
 *   on the wire only when given, so older calls send the same bytes.
 * - The file calls (WriteFile, ReadFile, StatFile, ListDir, RemoveFile) are
 *   new: their options map one to one onto their fields.
 *
 * Everything here is pure: no I/O, no transport.
 */
import { create } from "@bufbuild/protobuf";
import {
  type BranchMode,
  type SnapshotStatusName,
  toProtoBranchMode,
  toProtoSnapshotStatus,
} from "./enums.js";
import {
  type BranchSandboxRequest,
  BranchSandboxRequestSchema,
  type ExecRequest,
  ExecRequestSchema,
  type ListDirRequest,
  ListDirRequestSchema,
  type ListSandboxesRequest,
  ListSandboxesRequestSchema,
  type ReadConsoleRequest,
  ReadConsoleRequestSchema,
  type ReadFileRequest,
  ReadFileRequestSchema,
  type RemoveFileRequest,
  RemoveFileRequestSchema,
  type SetSandboxTtlRequest,
  SetSandboxTtlRequestSchema,
  type SpawnSandboxesRequest,
  SpawnSandboxesRequestSchema,
  type StatFileRequest,
  StatFileRequestSchema,
  type WriteFileHeader,
  WriteFileHeaderSchema,
} from "./gen/forkd/v1/sandbox_pb.js";
import {
  type CreateSnapshotRequest,
  CreateSnapshotRequestSchema,
  type DeleteSnapshotRequest,
  DeleteSnapshotRequestSchema,
  type ListSnapshotsRequest,
  ListSnapshotsRequestSchema,
  SnapshotStatus,
} from "./gen/forkd/v1/snapshot_pb.js";

/** Options of {@link Controller.spawnSandboxes}. */
export interface SpawnOptions {
  /** Snapshot to fork the children from; empty or absent means a cold boot. */
  tag?: string | undefined;
  /** How many sandboxes to start (the server accepts 1 to 1000). Default 1. */
  n?: number | undefined;
  /** Record the sandboxes as live-forkable (every sandbox is). Default false. */
  liveFork?: boolean | undefined;
  /** Guest RAM in MiB for a cold boot (36 to 65536); absent means 256. */
  memoryMib?: number | undefined;
  /** vCPUs for a cold boot (1 to 8); absent means 2. */
  vcpus?: number | undefined;
  /** Labels attached to every new sandbox. */
  labels?: Readonly<Record<string, string>> | undefined;
  /** Wait for a WRITING snapshot to become READY instead of failing. */
  waitForSnapshot?: boolean | undefined;
  /**
   * Name of a Linux image in the daemon's images directory to cold boot
   * instead of the reference guest; absent or empty means the reference
   * guest. Needs a host with Intel VMX or AMD SVM (elsewhere the call fails
   * with FAILED_PRECONDITION); an unknown image is NOT_FOUND, and `image`
   * together with `tag` is INVALID_ARGUMENT: children of a snapshot run the
   * image it was taken of (see {@link CreateSnapshotOptions.image}).
   */
  image?: string | undefined;
  /**
   * Lifetime of each sandbox in seconds from when it starts: it is then
   * deleted as {@link Controller.deleteSandbox} would (snapshots taken of it
   * stay). Absent or 0 means the daemon's `--default-ttl` (no expiry unless
   * set); above the daemon's `--max-ttl` is INVALID_ARGUMENT. Each
   * sandbox's `expireTime` says when (absent: never).
   */
  ttlSeconds?: number | bigint | undefined;
  /**
   * Back a cold-booted reference guest's RAM with 2 MiB huge pages from the
   * host's pool (`memoryMib` must be even; too few free huge pages is
   * RESOURCE_EXHAUSTED). Children of a snapshot use its page size. Default
   * false.
   */
  hugePages?: boolean | undefined;
}

/** Options of {@link Controller.branchSandbox}. */
export interface BranchOptions {
  /** Tag of the new snapshot; absent means a server-generated one. */
  tag?: string | undefined;
  /** Legacy spelling of `mode: "diff"`; ignored when `mode` is given. */
  diff?: boolean | undefined;
  /** Also count the pages dirtied since the base snapshot. Default false. */
  measureDiff?: boolean | undefined;
  /** How to capture memory; absent lets the server pick (FULL, or DIFF for `diff`). */
  mode?: BranchMode | undefined;
  /**
   * LIVE only: `false` returns as soon as the guest runs again, with the
   * snapshot still WRITING. Default true.
   */
  wait?: boolean | undefined;
}

/** Options of {@link Controller.exec} and {@link Controller.execStream}. */
export interface ExecOptions {
  /**
   * Stop the command after this many milliseconds; the call then fails with
   * DEADLINE_EXCEEDED and the sandbox stays usable. Absent means no limit.
   */
  timeoutMs?: number | undefined;
  /**
   * Linux sandboxes only: variables added to the guest's default
   * environment. Keys must be non-empty without `=` or NUL.
   */
  env?: Readonly<Record<string, string>> | undefined;
  /** Linux sandboxes only: the absolute working directory; absent means `/`. */
  cwd?: string | undefined;
  /**
   * Linux sandboxes only: bytes written to the command's standard input,
   * which is then closed; a string is sent as UTF-8. At most 1 MiB. Absent
   * or empty means standard input is `/dev/null`.
   */
  stdin?: Uint8Array | string | undefined;
}

/** Options of {@link Controller.readConsole}. */
export interface ReadConsoleOptions {
  /**
   * How many bytes of the console log's end to return, at most 1048576;
   * absent or 0 means the server's 65536.
   */
  tailBytes?: number | undefined;
}

/** Options of {@link Controller.writeFile}. */
export interface WriteFileOptions {
  /**
   * Permission bits of the new file, for example `0o755`; absent or 0 means
   * `0o644`; the guest's umask is not applied. At most `0o7777`: the daemon
   * refuses higher bits (INVALID_ARGUMENT), so pass a local file's
   * `fs.Stats.mode` as `stats.mode & 0o7777`.
   */
  mode?: number | undefined;
  /** Create missing parent directories (mode 0755). Default false. */
  makeParents?: boolean | undefined;
  /** Fail with ALREADY_EXISTS if the path exists instead of replacing it. Default false. */
  noOverwrite?: boolean | undefined;
  /**
   * Bytes per data message: smaller source chunks are gathered up to it,
   * larger ones split. Default 1 MiB ({@link DEFAULT_UPLOAD_CHUNK_SIZE}),
   * at most 3 MiB ({@link MAX_UPLOAD_CHUNK_SIZE}): a gRPC message must stay
   * under 4 MiB.
   */
  chunkSize?: number | undefined;
}

/** Options of {@link Controller.readFile} and the calls built on it. */
export interface ReadFileOptions {
  /** First byte to read; past the end of the file reads nothing. Default 0. */
  offset?: number | bigint | undefined;
  /** How many bytes at most; absent or 0 means to the end of the file. */
  length?: number | bigint | undefined;
}

/** Options of {@link Controller.removeFile}. */
export interface RemoveFileOptions {
  /** Remove a directory and everything in it. Default false. */
  recursive?: boolean | undefined;
}

/** The default data message size of {@link Controller.writeFile}: 1 MiB. */
export const DEFAULT_UPLOAD_CHUNK_SIZE = 1 << 20;
/** The largest data message size {@link WriteFileOptions.chunkSize} allows: 3 MiB. */
export const MAX_UPLOAD_CHUNK_SIZE = 3 << 20;

/** One warm-up command of {@link CreateSnapshotOptions}. */
export interface WarmupCommand {
  /** The command and its arguments, as for exec. */
  argv: readonly string[];
  /** Limit in milliseconds; absent means the server's default (60000). */
  timeoutMs?: number | undefined;
}

/** Options of {@link Controller.createSnapshot}. */
export interface CreateSnapshotOptions {
  /** Tag for the snapshot; absent means a server-generated one. */
  tag?: string | undefined;
  /** Guest RAM in MiB; absent means 256, or the image's default with `image`. */
  memoryMib?: number | undefined;
  /** vCPUs; absent means 2. */
  vcpus?: number | undefined;
  /** Commands run in order before the snapshot; an argv alone is allowed. */
  warmup?: ReadonlyArray<WarmupCommand | readonly string[]> | undefined;
  /** Keep the warmed sandbox running after the snapshot. Default false. */
  keepRunning?: boolean | undefined;
  /**
   * Name of a Linux image in the daemon's images directory to boot instead
   * of the reference guest (as {@link SpawnOptions.image}); absent or empty
   * means the reference guest. The snapshot records it as `image`, and the
   * children spawned from it run it.
   */
  image?: string | undefined;
}

/** Options of {@link Controller.listSandboxes}. */
export interface ListSandboxesOptions {
  /** Only sandboxes carrying every one of these labels with the same value. */
  labels?: Readonly<Record<string, string>> | undefined;
}

/** Options of {@link Controller.listSnapshots}. */
export interface ListSnapshotsOptions {
  /** Only snapshots with this status (a name or the enum); absent means all. */
  status?: SnapshotStatusName | SnapshotStatus | undefined;
}

/** Options of {@link Controller.deleteSnapshot}. */
export interface DeleteSnapshotOptions {
  /** Also delete every snapshot that depends on this one. Default false. */
  cascade?: boolean | undefined;
  /** Delete even when dependents or running children would be orphaned. */
  force?: boolean | undefined;
}

/** Builds the SpawnSandboxes request; `live_fork` is set only when true. */
export function spawnSandboxesRequest(opts: SpawnOptions = {}): SpawnSandboxesRequest {
  const { tag = "", n = 1, liveFork = false, waitForSnapshot = false } = opts;
  const req = create(SpawnSandboxesRequestSchema, {
    snapshotTag: checkString("tag", tag),
    n: checkUint32("n", n),
    memoryMib: checkUint32("memoryMib", opts.memoryMib ?? 0),
    vcpus: checkUint32("vcpus", opts.vcpus ?? 0),
    labels: checkLabels("labels", opts.labels),
    waitForSnapshot: checkBool("waitForSnapshot", waitForSnapshot),
    image: checkString("image", opts.image ?? ""),
    ttlSeconds: checkUint64("ttlSeconds", opts.ttlSeconds ?? 0),
    hugePages: checkBool("hugePages", opts.hugePages ?? false),
  });
  if (checkBool("liveFork", liveFork)) {
    req.liveFork = true;
  }
  return req;
}

/**
 * Builds the BranchSandbox request: only `mode` when it is given, else the
 * legacy `diff` when true; `wait` only when false.
 */
export function branchSandboxRequest(
  sandboxId: string,
  opts: BranchOptions = {},
): BranchSandboxRequest {
  const { tag = "", diff = false, measureDiff = false, mode, wait = true } = opts;
  checkBool("diff", diff);
  const req = create(BranchSandboxRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    tag: checkString("tag", tag),
    measureDiff: checkBool("measureDiff", measureDiff),
  });
  if (mode !== undefined) {
    req.mode = toProtoBranchMode(mode);
  } else if (diff) {
    req.diff = true;
  }
  if (!checkBool("wait", wait)) {
    req.wait = false;
  }
  return req;
}

/**
 * Builds the Exec request; `env`, `cwd` and `stdin` only when given (a
 * string stdin as UTF-8).
 */
export function execRequest(
  sandboxId: string,
  argv: readonly string[],
  opts: ExecOptions = {},
): ExecRequest {
  return create(ExecRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    argv: checkArgv("argv", argv),
    timeoutMs: checkUint32("timeoutMs", opts.timeoutMs ?? 0),
    env: checkLabels("env", opts.env),
    cwd: checkString("cwd", opts.cwd ?? ""),
    stdin: checkBytes("stdin", opts.stdin),
  });
}

/** Builds the ReadConsole request; `tailBytes` absent means 0 (the server's default). */
export function readConsoleRequest(
  sandboxId: string,
  opts: ReadConsoleOptions = {},
): ReadConsoleRequest {
  return create(ReadConsoleRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    tailBytes: checkUint32("tailBytes", opts.tailBytes ?? 0),
  });
}

/** Builds the SetSandboxTtl request; `ttlSeconds` 0 clears the expiry. */
export function setSandboxTtlRequest(
  sandboxId: string,
  ttlSeconds: number | bigint,
): SetSandboxTtlRequest {
  return create(SetSandboxTtlRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    ttlSeconds: checkUint64("ttlSeconds", ttlSeconds),
  });
}

/**
 * Builds the header (the first message) of a WriteFile upload. The
 * options' `chunkSize` is not part of it: see {@link uploadChunkSize}.
 */
export function writeFileHeader(
  sandboxId: string,
  path: string,
  opts: WriteFileOptions = {},
): WriteFileHeader {
  return create(WriteFileHeaderSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    path: checkString("path", path),
    mode: checkUint32("mode", opts.mode ?? 0),
    makeParents: checkBool("makeParents", opts.makeParents ?? false),
    noOverwrite: checkBool("noOverwrite", opts.noOverwrite ?? false),
  });
}

/**
 * The data message size of a WriteFile upload: `chunkSize`, an integer
 * from 1 to {@link MAX_UPLOAD_CHUNK_SIZE}, or {@link DEFAULT_UPLOAD_CHUNK_SIZE}.
 */
export function uploadChunkSize(opts: WriteFileOptions = {}): number {
  const { chunkSize = DEFAULT_UPLOAD_CHUNK_SIZE } = opts;
  if (
    typeof chunkSize !== "number" ||
    !Number.isInteger(chunkSize) ||
    chunkSize < 1 ||
    chunkSize > MAX_UPLOAD_CHUNK_SIZE
  ) {
    throw new RangeError(
      `chunkSize must be an integer from 1 to ${MAX_UPLOAD_CHUNK_SIZE}; got ${String(chunkSize)}`,
    );
  }
  return chunkSize;
}

/** Builds the ReadFile request; `offset` and `length` absent mean 0 (the whole file). */
export function readFileRequest(
  sandboxId: string,
  path: string,
  opts: ReadFileOptions = {},
): ReadFileRequest {
  return create(ReadFileRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    path: checkString("path", path),
    offset: checkUint64("offset", opts.offset ?? 0),
    length: checkUint64("length", opts.length ?? 0),
  });
}

/** Builds the StatFile request. */
export function statFileRequest(sandboxId: string, path: string): StatFileRequest {
  return create(StatFileRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    path: checkString("path", path),
  });
}

/** Builds the ListDir request. */
export function listDirRequest(sandboxId: string, path: string): ListDirRequest {
  return create(ListDirRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    path: checkString("path", path),
  });
}

/** Builds the RemoveFile request. */
export function removeFileRequest(
  sandboxId: string,
  path: string,
  opts: RemoveFileOptions = {},
): RemoveFileRequest {
  return create(RemoveFileRequestSchema, {
    sandboxId: checkString("sandboxId", sandboxId),
    path: checkString("path", path),
    recursive: checkBool("recursive", opts.recursive ?? false),
  });
}

/** Builds the ListSandboxes request. */
export function listSandboxesRequest(opts: ListSandboxesOptions = {}): ListSandboxesRequest {
  return create(ListSandboxesRequestSchema, { labelSelector: checkLabels("labels", opts.labels) });
}

/** Builds the ListSnapshots request. */
export function listSnapshotsRequest(opts: ListSnapshotsOptions = {}): ListSnapshotsRequest {
  const { status } = opts;
  return create(ListSnapshotsRequestSchema, {
    status: status === undefined ? SnapshotStatus.UNSPECIFIED : toProtoSnapshotStatus(status),
  });
}

/** Builds the CreateSnapshot request. */
export function createSnapshotRequest(opts: CreateSnapshotOptions = {}): CreateSnapshotRequest {
  const warmup = (opts.warmup ?? []).map((cmd, i) => {
    const { argv, timeoutMs = 0 } = isArgv(cmd) ? { argv: cmd } : cmd;
    return {
      argv: checkArgv(`warmup[${i}].argv`, argv),
      timeoutMs: checkUint32(`warmup[${i}].timeoutMs`, timeoutMs),
    };
  });
  return create(CreateSnapshotRequestSchema, {
    tag: checkString("tag", opts.tag ?? ""),
    memoryMib: checkUint32("memoryMib", opts.memoryMib ?? 0),
    vcpus: checkUint32("vcpus", opts.vcpus ?? 0),
    warmup,
    keepRunning: checkBool("keepRunning", opts.keepRunning ?? false),
    image: checkString("image", opts.image ?? ""),
  });
}

/** Builds the DeleteSnapshot request. */
export function deleteSnapshotRequest(
  tag: string,
  opts: DeleteSnapshotOptions = {},
): DeleteSnapshotRequest {
  return create(DeleteSnapshotRequestSchema, {
    tag: checkString("tag", tag),
    cascade: checkBool("cascade", opts.cascade ?? false),
    force: checkBool("force", opts.force ?? false),
  });
}

// Runtime checks for callers without type checking. They reject only what
// cannot be encoded or would be silently misread (a "false" string is
// truthy); range rules such as n <= 1000 are the server's to enforce.

function checkString(name: string, value: unknown): string {
  if (typeof value !== "string") {
    throw new TypeError(`${name} must be a string; got ${typeof value}`);
  }
  return value;
}

function checkBool(name: string, value: unknown): boolean {
  if (typeof value !== "boolean") {
    throw new TypeError(`${name} must be a boolean; got ${typeof value}`);
  }
  return value;
}

function checkUint32(name: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
    throw new RangeError(`${name} must be an integer from 0 to 4294967295; got ${String(value)}`);
  }
  return value;
}

const UINT64_MAX = (1n << 64n) - 1n;

function checkUint64(name: string, value: unknown): bigint {
  const ok =
    (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) ||
    (typeof value === "bigint" && value >= 0n && value <= UINT64_MAX);
  if (!ok) {
    throw new RangeError(`${name} must be an integer from 0 to ${UINT64_MAX}; got ${String(value)}`);
  }
  return BigInt(value as number | bigint);
}

const encoder = new TextEncoder();

function checkBytes(name: string, value: unknown): Uint8Array {
  if (value === undefined) {
    return new Uint8Array(0);
  }
  if (typeof value === "string") {
    return encoder.encode(value);
  }
  if (!(value instanceof Uint8Array)) {
    throw new TypeError(`${name} must be a Uint8Array or a string`);
  }
  return value;
}

function isArgv(value: unknown): value is readonly string[] {
  return Array.isArray(value);
}

function checkArgv(name: string, value: unknown): string[] {
  if (!isArgv(value)) {
    throw new TypeError(`${name} must be an array of strings`);
  }
  return value.map((arg, i) => checkString(`${name}[${i}]`, arg));
}

function checkLabels(name: string, value: unknown): Record<string, string> {
  if (value === undefined) {
    return {};
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TypeError(`${name} must be an object of string values`);
  }
  const labels: Record<string, string> = {};
  for (const [key, v] of Object.entries(value)) {
    labels[key] = checkString(`${name}.${key}`, v);
  }
  return labels;
}
