/**
 * TypeScript client of forkd, the KVM microVM sandbox runtime.
 *
 * @example
 * ```ts
 * import { Controller } from "@forkd/client";
 * await using forkd = new Controller({ target: "127.0.0.1:50051" });
 * const sandboxes = await forkd.spawnSandboxes({ n: 2 });   // sandboxes[0].id, ...
 * ```
 *
 * @packageDocumentation
 */

export { Controller } from "./controller.js";
export type { ControllerOptions } from "./controller.js";
export {
  BRANCH_MODES,
  type BranchMode,
  type SnapshotStatusName,
  isBranchMode,
  toBranchMode,
  toSnapshotStatusName,
} from "./enums.js";
export type {
  BranchOptions,
  CreateSnapshotOptions,
  DeleteSnapshotOptions,
  ExecOptions,
  ListSandboxesOptions,
  ListSnapshotsOptions,
  ReadConsoleOptions,
  ReadFileOptions,
  RemoveFileOptions,
  SpawnOptions,
  WarmupCommand,
  WriteFileOptions,
} from "./requests.js";
export { DEFAULT_UPLOAD_CHUNK_SIZE, MAX_UPLOAD_CHUNK_SIZE } from "./requests.js";
export { type ExecEvent, ExecResult } from "./exec.js";
export { FileDownload, type FileSource } from "./files.js";
export {
  type BranchResult,
  type CreateSnapshotResult,
  type ReadFileResult,
  SpawnResult,
  type WriteFileResult,
} from "./results.js";
export { ForkdError, grpcCodeName } from "./errors.js";
export { DEFAULT_TARGET, ResettingSessionManager, bearerAuth } from "./transport.js";
export { Code } from "@connectrpc/connect";

// Generated protobuf types, schemas and services (forkd.v1). The proto enum
// BranchMode is exported as ProtoBranchMode: the root BranchMode is the
// string union the Controller takes.
export {
  type BranchSandboxRequest,
  BranchSandboxRequestSchema,
  type BranchSandboxResponse,
  BranchSandboxResponseSchema,
  type ExecExit,
  type ExecRequest,
  ExecRequestSchema,
  type ExecResponse,
  type FileInfo,
  FileInfoSchema,
  FileType,
  type GuestBoot,
  type ListDirRequest,
  ListDirRequestSchema,
  type ListDirResponse,
  ListDirResponseSchema,
  type ReadConsoleRequest,
  ReadConsoleRequestSchema,
  type ReadConsoleResponse,
  ReadConsoleResponseSchema,
  type ReadFileEnd,
  ReadFileEndSchema,
  type ReadFileRequest,
  ReadFileRequestSchema,
  type ReadFileResponse,
  ReadFileResponseSchema,
  type RemoveFileRequest,
  RemoveFileRequestSchema,
  type RemoveFileResponse,
  type Sandbox,
  SandboxSchema,
  SandboxService,
  SandboxState,
  type SetSandboxTtlRequest,
  SetSandboxTtlRequestSchema,
  type SetSandboxTtlResponse,
  type SpawnFailure,
  type SpawnSandboxesRequest,
  SpawnSandboxesRequestSchema,
  type SpawnSandboxesResponse,
  SpawnSandboxesResponseSchema,
  type StatFileRequest,
  StatFileRequestSchema,
  type StatFileResponse,
  type WriteFileHeader,
  WriteFileHeaderSchema,
  type WriteFileRequest,
  WriteFileRequestSchema,
  type WriteFileResponse,
  WriteFileResponseSchema,
} from "./gen/forkd/v1/sandbox_pb.js";
export {
  BranchMode as ProtoBranchMode,
  type CreateSnapshotRequest,
  CreateSnapshotRequestSchema,
  type CreateSnapshotResponse,
  type Snapshot,
  SnapshotSchema,
  SnapshotService,
  SnapshotStatus,
  type WatchSnapshotResponse,
  WatchSnapshotResponseSchema,
} from "./gen/forkd/v1/snapshot_pb.js";

/** The request builders that implement the compatibility rules. */
export {
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
