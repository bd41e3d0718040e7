/**
 * Wire-level helpers: read protobuf fields from encoded bytes, and a TCP
 * proxy that records the gRPC request messages a client really sends.
 */
import { once } from "node:events";
import { type AddressInfo, type Socket, connect, createServer } from "node:net";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

/** A decoded field value: a varint, or the bytes of a length-delimited field. */
export type FieldValue = bigint | Uint8Array;

/**
 * The fields present in an encoded message, by field number (repeated
 * occurrences in order). Only varint and length-delimited fields are
 * decoded; others are skipped and recorded as their raw bytes.
 */
export function wireFields(bytes: Uint8Array): Map<number, FieldValue[]> {
  const reader = new BinaryReader(bytes);
  const fields = new Map<number, FieldValue[]>();
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    let value: FieldValue;
    if (wireType === WireType.Varint) {
      value = BigInt(reader.uint64());
    } else if (wireType === WireType.LengthDelimited) {
      value = reader.bytes();
    } else {
      value = reader.skip(wireType, fieldNo);
    }
    const list = fields.get(fieldNo) ?? [];
    list.push(value);
    fields.set(fieldNo, list);
  }
  return fields;
}

/** One request stream seen by the proxy: its HTTP/2 stream id and gRPC messages. */
export interface CapturedCall {
  readonly streamId: number;
  readonly messages: Uint8Array[];
}

/** One HTTP/2 frame the client sent (its header; RST_STREAM's error code). */
export interface Http2Frame {
  readonly streamId: number;
  /** 0 DATA, 1 HEADERS, 3 RST_STREAM, 4 SETTINGS, ... */
  readonly type: number;
  readonly flags: number;
  /** The error code of a RST_STREAM frame. */
  readonly errorCode?: number;
}

/** HTTP/2 frame types and flags used by the tests. */
export const H2 = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, END_STREAM: 0x1, CANCEL: 0x8 } as const;

/** A recording TCP proxy in front of a gRPC server. */
export interface WireProxy {
  /** `"127.0.0.1:PORT"` to point a client at. */
  readonly target: string;
  /** The client-to-server calls so far, in the order the client opened them. */
  calls(): CapturedCall[];
  /** Every HTTP/2 frame the client sent so far, connection by connection. */
  frames(): Http2Frame[];
  /** Stops listening and drops every connection. */
  close(): Promise<void>;
}

/** Starts a proxy on a free loopback port that forwards to `upstream` ("host:port"). */
export async function startWireProxy(upstream: string): Promise<WireProxy> {
  const [host = "", portText = ""] = upstream.split(/:(?=\d+$)/);
  const conns: { sockets: Socket[]; sent: Buffer[] }[] = [];
  const server = createServer((client) => {
    const upstreamSocket = connect(Number(portText), host);
    const conn = { sockets: [client, upstreamSocket], sent: [] as Buffer[] };
    conns.push(conn);
    client.on("data", (chunk: Buffer) => {
      conn.sent.push(chunk);
      upstreamSocket.write(chunk);
    });
    upstreamSocket.pipe(client);
    const drop = (): void => conn.sockets.forEach((s) => s.destroy());
    client.on("error", drop).on("close", drop);
    upstreamSocket.on("error", drop).on("close", drop);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  return {
    target: `127.0.0.1:${port}`,
    calls: () => conns.flatMap((c) => grpcCalls(http2DataByStream(Buffer.concat(c.sent)))),
    frames: () => conns.flatMap((c) => http2Frames(Buffer.concat(c.sent))),
    close: async () => {
      conns.forEach((c) => c.sockets.forEach((s) => s.destroy()));
      server.close();
      await once(server, "close");
    },
  };
}

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
const FRAME_DATA = 0x0;
const FLAG_PADDED = 0x8;

/** The frames of a client's HTTP/2 byte stream, after the preface. */
function http2Frames(bytes: Buffer): Http2Frame[] {
  if (!bytes.subarray(0, PREFACE.length).equals(PREFACE)) {
    throw new Error("not an HTTP/2 client connection (no preface)");
  }
  const frames: Http2Frame[] = [];
  let pos = PREFACE.length;
  while (pos + 9 <= bytes.length) {
    const length = bytes.readUIntBE(pos, 3);
    const type = bytes.readUInt8(pos + 3);
    const flags = bytes.readUInt8(pos + 4);
    const streamId = bytes.readUInt32BE(pos + 5) & 0x7fff_ffff;
    if (type === H2.RST_STREAM && pos + 13 <= bytes.length) {
      frames.push({ streamId, type, flags, errorCode: bytes.readUInt32BE(pos + 9) });
    } else {
      frames.push({ streamId, type, flags });
    }
    pos += 9 + length;
  }
  return frames;
}

/** Splits a client's HTTP/2 byte stream into the DATA payload of each stream. */
function http2DataByStream(bytes: Buffer): Map<number, Buffer> {
  if (!bytes.subarray(0, PREFACE.length).equals(PREFACE)) {
    throw new Error("not an HTTP/2 client connection (no preface)");
  }
  const data = new Map<number, Buffer[]>();
  let pos = PREFACE.length;
  while (pos + 9 <= bytes.length) {
    const length = bytes.readUIntBE(pos, 3);
    const type = bytes.readUInt8(pos + 3);
    const flags = bytes.readUInt8(pos + 4);
    const streamId = bytes.readUInt32BE(pos + 5) & 0x7fff_ffff;
    let payload = bytes.subarray(pos + 9, pos + 9 + length);
    pos += 9 + length;
    if (type !== FRAME_DATA) {
      continue;
    }
    if (flags & FLAG_PADDED) {
      const padLength = payload.readUInt8(0);
      payload = payload.subarray(1, payload.length - padLength);
    }
    const list = data.get(streamId) ?? [];
    list.push(payload);
    data.set(streamId, list);
  }
  return new Map([...data].map(([id, chunks]) => [id, Buffer.concat(chunks)]));
}

/** Splits each stream's body into gRPC length-prefixed messages. */
function grpcCalls(streams: Map<number, Buffer>): CapturedCall[] {
  return [...streams]
    .sort(([a], [b]) => a - b)
    .map(([streamId, body]) => {
      const messages: Uint8Array[] = [];
      let pos = 0;
      while (pos + 5 <= body.length) {
        if (body.readUInt8(pos) !== 0) {
          throw new Error(`stream ${streamId}: compressed gRPC message`);
        }
        const length = body.readUInt32BE(pos + 1);
        messages.push(new Uint8Array(body.subarray(pos + 5, pos + 5 + length)));
        pos += 5 + length;
      }
      return { streamId, messages };
    });
}
