/** String names for the proto enums the Controller takes and returns. */
import {
  BranchMode as ProtoBranchMode,
  SnapshotStatus,
} from "./gen/forkd/v1/snapshot_pb.js";

/**
 * How a branch captures guest memory.
 *
 * - `"full"`: pause, write all of RAM, resume.
 * - `"diff"`: pause, write only the pages dirtied since the base snapshot, resume.
 * - `"live"`: pause only to save vCPU/device state, then copy memory in the
 *   background while the guest runs.
 */
export type BranchMode = "full" | "diff" | "live";

/** Every {@link BranchMode}, in the order of the proto enum. */
export const BRANCH_MODES: readonly BranchMode[] = ["full", "diff", "live"];

/** A snapshot status by name, as {@link Controller.listSnapshots} accepts it. */
export type SnapshotStatusName = "writing" | "ready" | "failed";

const BRANCH_MODE_VALUES: Readonly<Record<BranchMode, ProtoBranchMode>> = {
  full: ProtoBranchMode.FULL,
  diff: ProtoBranchMode.DIFF,
  live: ProtoBranchMode.LIVE,
};

const STATUS_VALUES: Readonly<Record<SnapshotStatusName, SnapshotStatus>> = {
  writing: SnapshotStatus.WRITING,
  ready: SnapshotStatus.READY,
  failed: SnapshotStatus.FAILED,
};

/** Whether `value` is a {@link BranchMode}. */
export function isBranchMode(value: unknown): value is BranchMode {
  return typeof value === "string" && Object.hasOwn(BRANCH_MODE_VALUES, value);
}

/**
 * Converts a {@link BranchMode} to the proto enum.
 *
 * @throws RangeError if `mode` is not one of {@link BRANCH_MODES} (for
 * callers without type checking).
 */
export function toProtoBranchMode(mode: BranchMode): ProtoBranchMode {
  if (!isBranchMode(mode)) {
    throw new RangeError(
      `mode must be one of ${BRANCH_MODES.map((m) => `"${m}"`).join(", ")}; got ${JSON.stringify(mode)}`,
    );
  }
  return BRANCH_MODE_VALUES[mode];
}

/**
 * Converts the proto enum (for example `Snapshot.mode`) to a
 * {@link BranchMode}; `undefined` for UNSPECIFIED or an unknown value.
 */
export function toBranchMode(mode: ProtoBranchMode): BranchMode | undefined {
  return BRANCH_MODES.find((m) => BRANCH_MODE_VALUES[m] === mode);
}

/**
 * Converts a status filter to the proto enum: a name, or the enum itself.
 *
 * @throws RangeError for anything else.
 */
export function toProtoSnapshotStatus(status: SnapshotStatus | SnapshotStatusName): SnapshotStatus {
  if (typeof status === "string" && Object.hasOwn(STATUS_VALUES, status)) {
    return STATUS_VALUES[status];
  }
  if (typeof status === "number" && SnapshotStatus[status] !== undefined) {
    return status;
  }
  throw new RangeError(
    `status must be "writing", "ready", "failed" or a SnapshotStatus; got ${JSON.stringify(status)}`,
  );
}

/**
 * Converts the proto enum (for example `Snapshot.status`) to its name;
 * `undefined` for UNSPECIFIED or an unknown value.
 */
export function toSnapshotStatusName(status: SnapshotStatus): SnapshotStatusName | undefined {
  return (Object.keys(STATUS_VALUES) as SnapshotStatusName[]).find(
    (name) => STATUS_VALUES[name] === status,
  );
}
