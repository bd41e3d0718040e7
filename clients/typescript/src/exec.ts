import { Code, ConnectError } from "@connectrpc/connect";
import type { ExecResponse } from "./gen/forkd/v1/sandbox_pb.js";

/** One event of {@link Controller.execStream}: output chunks, then the exit. */
export type ExecEvent =
  | { readonly kind: "stdout"; readonly data: Uint8Array }
  | { readonly kind: "stderr"; readonly data: Uint8Array }
  | {
      readonly kind: "exit";
      readonly exitCode: number;
      readonly durationUs: bigint;
      /**
       * The signal that killed the command, or 0 if it exited by itself.
       * Always set on events from {@link Controller.execStream}; optional
       * so that hand-made events (tests, fakes) need not carry it.
       */
      readonly signal?: number | undefined;
    };

const decoder = new TextDecoder();

/** The outcome of a command run with {@link Controller.exec}. */
export class ExecResult {
  /**
   * @param stdout - everything the command wrote to standard output
   * @param stderr - everything the command wrote to standard error
   * @param exitCode - the command's exit code (0 is success)
   * @param durationUs - time the command ran inside the guest, in microseconds
   * @param signal - the signal that killed the command (for example 9 for
   *   SIGKILL), or 0 if it exited by itself; when set, `exitCode` is
   *   128 + `signal`. Always 0 in a reference-guest sandbox.
   */
  constructor(
    readonly stdout: Uint8Array,
    readonly stderr: Uint8Array,
    readonly exitCode: number,
    readonly durationUs: bigint,
    readonly signal: number = 0,
  ) {}

  /** Standard output decoded as UTF-8. */
  get stdoutText(): string {
    return decoder.decode(this.stdout);
  }

  /** Standard error decoded as UTF-8. */
  get stderrText(): string {
    return decoder.decode(this.stderr);
  }

  /** Whether the exit code is 0. */
  get ok(): boolean {
    return this.exitCode === 0;
  }
}

/**
 * Converts one Exec stream message to an event; `undefined` for a message
 * with no event set (which the server never sends).
 */
export function toExecEvent(msg: ExecResponse): ExecEvent | undefined {
  const { event } = msg;
  switch (event.case) {
    case "stdout":
    case "stderr":
      return { kind: event.case, data: event.value };
    case "exit":
      return {
        kind: "exit",
        exitCode: event.value.exitCode,
        durationUs: event.value.durationUs,
        signal: event.value.signal,
      };
    default:
      return undefined;
  }
}

/**
 * Collects a stream of events into an ExecResult. The stream is read to its
 * end, so that the call's final status is checked too.
 *
 * @throws ConnectError (INTERNAL) if the stream ends without an exit event.
 */
export async function collectExec(events: AsyncIterable<ExecEvent>): Promise<ExecResult> {
  const stdout: Uint8Array[] = [];
  const stderr: Uint8Array[] = [];
  let exit: Extract<ExecEvent, { kind: "exit" }> | undefined;
  for await (const ev of events) {
    switch (ev.kind) {
      case "stdout":
        stdout.push(ev.data);
        break;
      case "stderr":
        stderr.push(ev.data);
        break;
      case "exit":
        exit = ev;
        break;
    }
  }
  if (exit === undefined) {
    throw new ConnectError("exec stream ended without an exit status", Code.Internal);
  }
  return new ExecResult(concat(stdout), concat(stderr), exit.exitCode, exit.durationUs, exit.signal ?? 0);
}

function concat(chunks: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}
