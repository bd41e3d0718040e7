/**
 * File round trip: uploads a local file into a Linux sandbox with
 * `writeFile`, streaming it from `fs.createReadStream`, downloads it back
 * with `readFile`, streaming it into a local file, and prints one JSON line:
 *
 *   {"uploaded":{"size":N,"sha256":"..."},"downloaded":{"size":N,"sha256":"..."}}
 *
 * `uploaded` is the guest's account of the file it wrote (checked by the
 * client against the bytes it sent), `downloaded` the end of the download
 * (checked against the bytes received). Neither direction holds the file
 * in memory, whatever its size. The exit status is 1 when the two differ
 * or a call fails, 2 for bad arguments.
 *
 * Needs a running Linux sandbox (`spawnSandboxes({ image })`; the
 * reference guest answers FAILED_PRECONDITION). From clients/typescript:
 *   npm run build
 *   FORKD_TARGET=127.0.0.1:50051 FORKD_TOKEN=... \
 *     node dist/examples/file_roundtrip.js SANDBOX_ID LOCAL_FILE GUEST_PATH [DOWNLOAD_PATH]
 * FORKD_TARGET defaults to 127.0.0.1:50051; FORKD_TOKEN is optional.
 * GUEST_PATH is absolute; missing parent directories are created.
 * DOWNLOAD_PATH (default LOCAL_FILE.roundtrip) is created or replaced.
 */
import { createReadStream, createWriteStream } from "node:fs";
import { pipeline } from "node:stream/promises";
import { Controller, ForkdError } from "@forkd/client";

const [sandboxId, localPath, guestPath, downloadArg] = process.argv.slice(2);
if (sandboxId === undefined || localPath === undefined || guestPath === undefined) {
  console.error(
    "usage: node dist/examples/file_roundtrip.js SANDBOX_ID LOCAL_FILE GUEST_PATH [DOWNLOAD_PATH]",
  );
  process.exit(2);
}
const downloadPath = downloadArg ?? `${localPath}.roundtrip`;

await using forkd = new Controller({
  target: process.env["FORKD_TARGET"] || "127.0.0.1:50051",
  token: process.env["FORKD_TOKEN"] || undefined,
});

try {
  // 1 MiB reads match writeFile's default chunk size: each read is sent as
  // one message (the default 64 KiB reads would be gathered into 1 MiB).
  const uploaded = await forkd.writeFile(
    sandboxId,
    guestPath,
    createReadStream(localPath, { highWaterMark: 1 << 20 }),
    { makeParents: true },
  );

  // The download is checked when it ends; pipeline() waits for that and
  // for the local file to be written, with backpressure both ways.
  const download = forkd.readFile(sandboxId, guestPath);
  await pipeline(download, createWriteStream(downloadPath));
  const end = download.end!; // set once the download has been checked

  const summary = {
    uploaded: { size: Number(uploaded.size), sha256: uploaded.sha256 },
    downloaded: { size: Number(end.size), sha256: end.sha256 },
  };
  console.log(JSON.stringify(summary));
  if (summary.uploaded.size !== summary.downloaded.size || uploaded.sha256 !== end.sha256) {
    console.error("file_roundtrip: the file read back differs from the one written");
    process.exitCode = 1;
  }
} catch (err) {
  if (!(err instanceof ForkdError)) throw err;
  console.error(`file_roundtrip: ${err.codeName}: ${err.rawMessage}`);
  process.exitCode = 1;
}
