import { type ClientHttp2Stream, type OutgoingHttpHeaders, constants } from "node:http2";
import { addAbortSignal } from "node:stream";
import type { Interceptor, Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

/** The daemon's default listen address. */
export const DEFAULT_TARGET = "127.0.0.1:50051";

/**
 * Turns a target into the base URL of the gRPC transport: `"host:port"`
 * becomes `"http://host:port"` (h2c, as the daemon serves); a full `http://`
 * or `https://` URL is kept as is.
 *
 * @throws TypeError for an empty target, a `unix:` target (not supported),
 * or another URL scheme.
 */
export function targetToBaseUrl(target: string): string {
  if (typeof target !== "string" || target.trim() === "") {
    throw new TypeError("target must be a non-empty string such as \"127.0.0.1:50051\"");
  }
  if (/^unix(-abstract)?:/i.test(target)) {
    throw new TypeError(
      `target ${JSON.stringify(target)}: Unix sockets are not supported; use the daemon's TCP listener (--listen)`,
    );
  }
  const url = /^[a-z][a-z0-9+.-]*:\/\//i.test(target) ? target : `http://${target}`;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError(`target ${JSON.stringify(target)} is not "host:port" or an http:// URL`);
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
    throw new TypeError(`target ${JSON.stringify(target)}: only http:// and https:// are supported`);
  }
  return url.replace(/\/+$/, "");
}

/** A gRPC transport and the HTTP/2 session it owns. */
export interface OwnedTransport {
  /** The transport to build clients on. */
  readonly transport: Transport;
  /** The session manager behind it; `abort()` closes the connection. */
  readonly session: Http2SessionManager;
}

/**
 * An Http2SessionManager whose streams, when a call is cancelled or fails
 * before its request body is complete, are reset with RST_STREAM alone.
 *
 * Connect cancels a call with `stream.close(code)`, and Node's
 * `Http2Stream.close()` first ends the writable side: the server gets an
 * END_STREAM (the request looks complete) and only then the RST_STREAM.
 * For a client-streaming call such as WriteFile that would tell the
 * daemon the upload was whole when the source had failed, and a daemon
 * that saw the end first would commit a truncated file. Destroying the
 * stream instead sends no END_STREAM: CANCEL (through an AbortSignal, as
 * Node's own `signal` option does) for a cancelled call, INTERNAL_ERROR
 * otherwise. A stream whose request body has ended closes as before.
 */
export class ResettingSessionManager extends Http2SessionManager {
  override async request(
    method: string,
    path: string,
    headers: OutgoingHttpHeaders,
    options: Parameters<Http2SessionManager["request"]>[3],
  ): Promise<ClientHttp2Stream> {
    const stream = await super.request(method, path, headers, options);
    resetWithoutEnd(stream);
    return stream;
  }
}

function resetWithoutEnd(stream: ClientHttp2Stream): void {
  const abort = new AbortController();
  addAbortSignal(abort.signal, stream);
  const close = stream.close.bind(stream);
  stream.close = (code?: number, callback?: () => void): void => {
    const open = !stream.writableEnded && !stream.destroyed && !stream.closed;
    if (!open || code === undefined || code === constants.NGHTTP2_NO_ERROR) {
      close(code, callback);
      return;
    }
    if (callback !== undefined) {
      stream.once("close", callback);
    }
    if (code === constants.NGHTTP2_CANCEL) {
      abort.abort();
    } else {
      stream.destroy(new Error(`stream reset with HTTP/2 error code ${code}`));
    }
  };
}

/** Creates a gRPC-over-HTTP/2 transport with its own session manager. */
export function createOwnedTransport(
  baseUrl: string,
  interceptors: readonly Interceptor[],
): OwnedTransport {
  const session = new ResettingSessionManager(baseUrl);
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager: session,
    interceptors: [...interceptors],
  });
  return { transport, session };
}

/** An interceptor that sends `authorization: Bearer <token>` on every call. */
export function bearerAuth(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => (req) => {
    req.header.set("authorization", value);
    return next(req);
  };
}
