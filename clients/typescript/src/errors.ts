import { Code, ConnectError } from "@connectrpc/connect";

/** gRPC status names, as servers and the gRPC spec spell them, by Connect code. */
const GRPC_CODE_NAMES: Readonly<Record<Code, string>> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

/** Returns the gRPC name of a status code, for example `"NOT_FOUND"`. */
export function grpcCodeName(code: Code): string {
  return GRPC_CODE_NAMES[code] ?? `CODE_${String(code)}`;
}

/**
 * A failed forkd call: the gRPC status the daemon (or the transport) returned.
 *
 * Every Controller method rejects with a ForkdError, streams included. A
 * non-zero exit code of an executed command is a result, not an error.
 */
export class ForkdError extends Error {
  /** The status code (Connect's numbering, which is gRPC's). */
  readonly code: Code;
  /** The gRPC name of `code`, for example `"NOT_FOUND"`. */
  readonly codeName: string;
  /** The server's message, without the code prefix. */
  readonly rawMessage: string;
  /** Response headers and trailers that came with the error. */
  readonly metadata: Headers;

  /** Wraps a ConnectError; prefer {@link toForkdError} for unknown values. */
  constructor(cause: ConnectError) {
    const codeName = grpcCodeName(cause.code);
    super(`${codeName}: ${cause.rawMessage}`, { cause });
    this.name = "ForkdError";
    this.code = cause.code;
    this.codeName = codeName;
    this.rawMessage = cause.rawMessage;
    this.metadata = cause.metadata;
  }
}

/**
 * A ForkdError raised by the client itself rather than returned by the
 * daemon, for example DATA_LOSS when a download does not match its checksum.
 */
export function clientError(code: Code, message: string): ForkdError {
  return new ForkdError(new ConnectError(message, code));
}

/** Converts anything a Connect call threw into a ForkdError. */
export function toForkdError(err: unknown): ForkdError {
  if (err instanceof ForkdError) {
    return err;
  }
  return new ForkdError(ConnectError.from(err));
}
