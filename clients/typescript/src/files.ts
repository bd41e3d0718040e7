/**
 * File transfers. An upload's source becomes data messages of a bounded
 * size, pulled from the source only as the transport sends them; a
 * download's bytes are checked against the size and SHA-256 its end message
 * carries; {@link downloadTo} saves a download under a local name only once
 * it has been checked.
 */
import { createHash, randomBytes } from "node:crypto";
import { open, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { Code } from "@connectrpc/connect";
import { clientError } from "./errors.js";
import type {
  ReadFileEnd,
  ReadFileResponse,
  WriteFileHeader,
  WriteFileResponse,
} from "./gen/forkd/v1/sandbox_pb.js";

/**
 * What {@link Controller.writeFile} uploads: bytes, a string (sent as its
 * UTF-8 encoding), or an iterable or async iterable of byte chunks, such as
 * a Node `Readable` (`fs.createReadStream(path)` yields `Buffer`s, which are
 * `Uint8Array`s).
 */
export type FileSource = Uint8Array | string | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** One WriteFile request message, as Connect takes it. */
export type WriteFileMessage =
  | { content: { case: "header"; value: WriteFileHeader } }
  | { content: { case: "data"; value: Uint8Array } };

const encoder = new TextEncoder();

/** The source as chunks; a TypeError for anything that is not a {@link FileSource}. */
function sourceChunks(source: unknown): Iterable<Uint8Array> | AsyncIterable<Uint8Array> {
  if (source instanceof Uint8Array) {
    return [source];
  }
  if (typeof source === "string") {
    return [encoder.encode(source)];
  }
  if (typeof source === "object" && source !== null) {
    if (Symbol.asyncIterator in source || Symbol.iterator in source) {
      return source as Iterable<Uint8Array> | AsyncIterable<Uint8Array>;
    }
  }
  throw new TypeError(
    `source must be a Uint8Array, a string, or an iterable or async iterable of Uint8Array chunks; got ${describe(source)}`,
  );
}

/**
 * Cuts a stream of chunks into pieces of exactly `size` bytes (the last one
 * shorter): smaller chunks are gathered into a buffer of `size` bytes,
 * larger ones are split into views of themselves (not copied). The source
 * is pulled only when the next piece is wanted, and at most `size` bytes
 * are held back. Empty chunks disappear.
 *
 * @throws TypeError when a chunk is not a Uint8Array.
 */
export async function* rechunk(
  source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
  size: number,
): AsyncGenerator<Uint8Array, void, undefined> {
  let pending: Uint8Array | undefined;
  let filled = 0;
  let index = 0;
  for await (const chunk of source as AsyncIterable<unknown>) {
    if (!(chunk instanceof Uint8Array)) {
      throw new TypeError(
        `source chunk ${index} is ${describe(chunk)}, not a Uint8Array (a Readable with an encoding set yields strings)`,
      );
    }
    index++;
    let pos = 0;
    if (pending !== undefined) {
      pos = Math.min(size - filled, chunk.length);
      pending.set(chunk.subarray(0, pos), filled);
      filled += pos;
      if (filled < size) {
        continue;
      }
      yield pending;
      pending = undefined;
      filled = 0;
    }
    while (chunk.length - pos >= size) {
      yield chunk.subarray(pos, pos + size);
      pos += size;
    }
    if (pos < chunk.length) {
      pending = new Uint8Array(size);
      pending.set(chunk.subarray(pos));
      filled = chunk.length - pos;
    }
  }
  if (pending !== undefined) {
    yield pending.subarray(0, filled);
  }
}

/**
 * One WriteFile upload: its request messages (the header, then the
 * source's bytes in pieces of `chunkSize`), the size and SHA-256 of what
 * was sent, and whether the source failed.
 */
export class Upload {
  readonly #source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>;
  readonly #chunks: AsyncGenerator<Uint8Array, void, undefined>;
  readonly #hash = createHash("sha256");
  #size = 0;
  #pulled = false;
  #sourceError: { readonly error: unknown } | undefined;
  #messages: AsyncGenerator<WriteFileMessage, void, undefined> | undefined;

  /** @throws TypeError when `source` is not a {@link FileSource}. */
  constructor(
    source: FileSource,
    chunkSize: number,
    readonly header: WriteFileHeader,
  ) {
    this.#source = sourceChunks(source);
    this.#chunks = rechunk(this.#source, chunkSize);
  }

  /**
   * The request stream, to be consumed once. When the source throws (or
   * yields something other than bytes), `onSourceError` is called first,
   * so that the caller can cancel the call before the stream ends: an
   * upload must never look complete when it is not.
   */
  messages(onSourceError: (error: unknown) => void): AsyncIterable<WriteFileMessage> {
    this.#messages ??= this.#generate(onSourceError);
    return this.#messages;
  }

  async *#generate(
    onSourceError: (error: unknown) => void,
  ): AsyncGenerator<WriteFileMessage, void, undefined> {
    yield { content: { case: "header", value: this.header } };
    for (;;) {
      let next: IteratorResult<Uint8Array, void>;
      try {
        this.#pulled = true;
        next = await this.#chunks.next();
      } catch (error) {
        this.#sourceError = { error };
        onSourceError(error);
        throw error;
      }
      if (next.done === true) {
        return;
      }
      this.#hash.update(next.value);
      this.#size += next.value.length;
      yield { content: { case: "data", value: next.value } };
    }
  }

  /** The source's error, when the upload failed because of it. */
  get sourceError(): { readonly error: unknown } | undefined {
    return this.#sourceError;
  }

  /** Bytes handed to the transport so far. */
  get size(): number {
    return this.#size;
  }

  /**
   * Checks the guest's account of the file against what was sent.
   *
   * @throws ForkdError DATA_LOSS when the size or SHA-256 differ.
   */
  verify(res: WriteFileResponse): void {
    const sha256 = this.#hash.copy().digest("hex");
    if (res.size !== BigInt(this.#size) || res.sha256.toLowerCase() !== sha256) {
      throw clientError(
        Code.DataLoss,
        `WriteFile ${this.header.path}: sent ${this.#size} bytes with SHA-256 ${sha256}, ` +
          `but the guest wrote ${res.size} bytes with SHA-256 ${res.sha256 || "(none)"}; the file there is not what was sent`,
      );
    }
  }

  /**
   * Lets go of the source when the call ended before consuming it all (an
   * error from the daemon, a closed controller): its iterator's `return()`
   * runs, which destroys a Node stream and so closes a file. Not awaited:
   * a source stuck in a read would hold it up. Nothing happens to a source
   * that was read to its end.
   */
  close(): void {
    const ignore = (): undefined => undefined;
    this.#messages?.return().catch(ignore);
    if (this.#pulled) {
      this.#chunks.return().catch(ignore);
      return;
    }
    // Never started: rechunk() has no iterator of the source to close.
    this.#chunks.return().catch(ignore);
    try {
      const source = this.#source as Partial<AsyncIterable<unknown> & Iterable<unknown>>;
      const it = source[Symbol.asyncIterator]?.() ?? source[Symbol.iterator]?.();
      Promise.resolve(it?.return?.()).catch(ignore);
    } catch {
      // A source that fails to make an iterator has nothing to close.
    }
  }
}

/**
 * The bytes of a {@link Controller.readFile} download, checked as they go:
 * iterating yields the data chunks (at most 64 KiB each) as they arrive;
 * once the stream has ended, the number of bytes and their SHA-256 are
 * compared with the end message's, and `end` is set. A mismatch, a stream
 * that ends without its end message, or a message after it throws a
 * {@link ForkdError} DATA_LOSS from the iterator's last step, after the
 * last chunk: the data is trustworthy only once the loop has ended without
 * an error. Leaving the loop early cancels the call.
 *
 * Node's `stream.pipeline(download, fs.createWriteStream(p))` writes it to a
 * file with backpressure (see also {@link Controller.readFileTo}).
 */
export class FileDownload implements AsyncIterable<Uint8Array> {
  readonly #chunks: AsyncGenerator<Uint8Array, void, undefined>;
  #end: ReadFileEnd | undefined;

  /** Checks `messages`, the ReadFile responses; `path` is for error messages. */
  constructor(
    messages: AsyncIterable<ReadFileResponse>,
    readonly path: string,
  ) {
    this.#chunks = this.#verify(messages);
  }

  /**
   * The end message (`size` and `sha256` of the bytes sent, the file's
   * `fileSize` when opened) once the download is complete and checked;
   * undefined before.
   */
  get end(): ReadFileEnd | undefined {
    return this.#end;
  }

  /** The data chunks; one pass only (the same iterator every time). */
  [Symbol.asyncIterator](): AsyncGenerator<Uint8Array, void, undefined> {
    return this.#chunks;
  }

  async *#verify(
    messages: AsyncIterable<ReadFileResponse>,
  ): AsyncGenerator<Uint8Array, void, undefined> {
    const hash = createHash("sha256");
    let size = 0;
    let end: ReadFileEnd | undefined;
    for await (const { event } of messages) {
      if (end !== undefined && event.case !== undefined) {
        throw clientError(
          Code.DataLoss,
          `ReadFile ${this.path}: a ${event.case} message after the end message`,
        );
      }
      switch (event.case) {
        case "data":
          hash.update(event.value);
          size += event.value.length;
          yield event.value;
          break;
        case "end":
          end = event.value;
          break;
        default:
          break;
      }
    }
    if (end === undefined) {
      throw clientError(
        Code.DataLoss,
        `ReadFile ${this.path}: the stream ended after ${size} bytes without its end message; the download is incomplete`,
      );
    }
    const sha256 = hash.digest("hex");
    if (end.size !== BigInt(size) || end.sha256.toLowerCase() !== sha256) {
      throw clientError(
        Code.DataLoss,
        `ReadFile ${this.path}: received ${size} bytes with SHA-256 ${sha256}, ` +
          `but the guest sent ${end.size} bytes with SHA-256 ${end.sha256 || "(none)"}`,
      );
    }
    this.#end = end;
  }
}

/** Collects a download into one array (after it has been checked). */
export async function collectDownload(download: FileDownload): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let length = 0;
  for await (const chunk of download) {
    chunks.push(chunk);
    length += chunk.length;
  }
  const out = new Uint8Array(length);
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}

/**
 * Writes a download to `localPath` atomically: into a temporary file beside
 * it (`.NAME.RANDOM.tmp`, created with mode 0666 less the umask), flushed
 * to disk, renamed over `localPath` only once the download has been
 * checked. On any error the temporary file is removed and `localPath` is
 * left as it was.
 */
export async function downloadTo(download: FileDownload, localPath: string): Promise<ReadFileEnd> {
  const tmp = join(
    dirname(localPath),
    `.${basename(localPath)}.${randomBytes(6).toString("hex")}.tmp`,
  );
  const file = await open(tmp, "wx", 0o666);
  let fileOpen = true;
  try {
    for await (const chunk of download) {
      for (let pos = 0; pos < chunk.length; ) {
        pos += (await file.write(chunk, pos, chunk.length - pos)).bytesWritten;
      }
    }
    await file.sync();
    fileOpen = false;
    await file.close();
    const end = download.end;
    if (end === undefined) {
      // The loop ended without an error, so the download was checked.
      throw clientError(Code.Internal, `ReadFile ${download.path}: the download did not finish`);
    }
    await rename(tmp, localPath);
    return end;
  } catch (err) {
    if (fileOpen) {
      await file.close().catch(() => undefined);
    }
    await rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

function describe(value: unknown): string {
  if (value === null) {
    return "null";
  }
  if (typeof value === "object") {
    return `a ${value.constructor?.name ?? "object"}`;
  }
  return `a ${typeof value}`;
}
