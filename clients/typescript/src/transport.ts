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

/** Creates a gRPC-over-HTTP/2 transport with its own session manager. */
export function createOwnedTransport(
  baseUrl: string,
  interceptors: readonly Interceptor[],
): OwnedTransport {
  const session = new Http2SessionManager(baseUrl);
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
