/**
 * Results that read natively: the spawn result is an array of its
 * sandboxes, and branch and create-snapshot results carry the snapshot's
 * tag. Both stay the generated response messages as far as existing code
 * can tell (the same fields, `$typeName`, `isMessage`, `toBinary`).
 */
import type { UnknownField } from "@bufbuild/protobuf";
import type {
  BranchSandboxResponse,
  ReadFileEnd,
  Sandbox,
  SpawnFailure,
  SpawnSandboxesResponse,
  WriteFileResponse,
} from "./gen/forkd/v1/sandbox_pb.js";
import type { CreateSnapshotResponse } from "./gen/forkd/v1/snapshot_pb.js";

/**
 * What `spawnSandboxes` resolves to: an array of the sandboxes that
 * started (`res[0]`, `res.length`, `for (const sb of res)`, `res.map(...)`,
 * `const [sb] = res`), which is also the SpawnSandboxesResponse it came
 * from: `sandboxes` (the same sandboxes, as a plain array), `failures` (the
 * sandboxes that did not start) and `elapsedMs` sit alongside.
 *
 * Array methods that make a new array (`map`, `filter`, `slice`, ...)
 * return plain arrays. `JSON.stringify` and `structuredClone` see only the
 * array; use `toJson(SpawnSandboxesResponseSchema, res)` or
 * `res.sandboxes` / `res.failures` for the whole response.
 */
export class SpawnResult extends Array<Sandbox> implements SpawnSandboxesResponse {
  readonly $typeName = "forkd.v1.SpawnSandboxesResponse" as const;
  declare $unknown?: UnknownField[];
  /** The started sandboxes as the response's own plain array. */
  sandboxes: Sandbox[];
  /** Per-sandbox failures (index, gRPC code name, message). */
  failures: SpawnFailure[];
  /** Milliseconds the daemon spent on the whole call. */
  elapsedMs: number;

  /** `map`, `filter`, `slice` and friends make plain arrays. */
  static override get [Symbol.species](): ArrayConstructor {
    return Array;
  }

  /** Wraps a SpawnSandboxesResponse; its arrays are shared, not copied. */
  constructor(response: SpawnSandboxesResponse) {
    if (!isSpawnResponse(response)) {
      throw new TypeError("SpawnResult wraps a SpawnSandboxesResponse");
    }
    super();
    this.push(...response.sandboxes);
    this.sandboxes = response.sandboxes;
    this.failures = response.failures;
    this.elapsedMs = response.elapsedMs;
    if (response.$unknown !== undefined) {
      this.$unknown = response.$unknown;
    }
  }
}

function isSpawnResponse(value: unknown): value is SpawnSandboxesResponse {
  return (
    typeof value === "object" &&
    value !== null &&
    (value as { $typeName?: unknown }).$typeName === "forkd.v1.SpawnSandboxesResponse"
  );
}

/** A BranchSandboxResponse plus `tag`, the new snapshot's tag. */
export type BranchResult = BranchSandboxResponse & {
  /** The new snapshot's tag (`snapshot.tag`). */
  readonly tag: string;
};

/** A CreateSnapshotResponse plus `tag`, the snapshot's tag. */
export type CreateSnapshotResult = CreateSnapshotResponse & {
  /** The snapshot's tag (`snapshot.tag`). */
  readonly tag: string;
};

/**
 * Adds a non-enumerable `tag` getter (`snapshot.tag`, "" without a
 * snapshot) to a response in place: it stays the same message object, so
 * `deepEqual`, spreads and encoding see only the proto fields.
 */
export function withSnapshotTag<R extends BranchSandboxResponse | CreateSnapshotResponse>(
  response: R,
): R & { readonly tag: string } {
  return Object.defineProperty(response, "tag", {
    get(this: R): string {
      return this.snapshot?.tag ?? "";
    },
    enumerable: false,
    configurable: true,
  }) as R & { readonly tag: string };
}

/**
 * What `writeFile` resolves to: the WriteFileResponse, the guest's `path`,
 * `size` (bytes written, a `bigint`) and `sha256` (lowercase hex), checked
 * against what the client sent.
 */
export type WriteFileResult = WriteFileResponse;

/**
 * What `readFileTo` resolves to, and a download's `end`: the ReadFileEnd
 * message, the `size` and `sha256` of the bytes sent (checked against what
 * was received) and `fileSize`, the file's size when it was opened (both
 * `bigint`).
 */
export type ReadFileResult = ReadFileEnd;
