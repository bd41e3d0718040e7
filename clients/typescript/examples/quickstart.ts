/**
 * Quick start: spawn a sandbox, run commands in it, branch it LIVE without
 * waiting, follow the copy, fork a child from the snapshot, clean up.
 *
 * Run against a daemon (`forkd serve`, default 127.0.0.1:50051):
 *   npm run build && node dist/examples/quickstart.js
 * FORKD_TARGET and FORKD_TOKEN override the address and supply a token.
 */
import { Controller, ForkdError, SnapshotStatus } from "@forkd/client";

// `await using` closes the HTTP/2 connection when the module is done.
await using forkd = new Controller({
  target: process.env["FORKD_TARGET"] ?? "127.0.0.1:50051",
  token: process.env["FORKD_TOKEN"] || undefined,
});
const tag = `quickstart-${Date.now()}`;
const sandboxIds: string[] = [];

try {
  // One cold-booted sandbox with 128 MiB of guest RAM.
  const spawned = await forkd.spawnSandboxes({ memoryMib: 128, labels: { app: "quickstart" } });
  const source = spawned[0]!; // the result is an array of the sandboxes
  sandboxIds.push(source.id);
  console.log(`spawned ${source.id} in ${spawned.elapsedMs.toFixed(1)} ms`);

  // Commands: output is collected; a non-zero exit code is a result.
  const hello = await forkd.exec(source.id, ["echo", "hello", "from", "the", "guest"]);
  console.log(`echo -> ${JSON.stringify(hello.stdoutText)} (exit ${hello.exitCode})`);
  await forkd.exec(source.id, ["fill", "64", "42"]);
  const sum = (await forkd.exec(source.id, ["checksum", "64"])).stdoutText.trim();
  console.log(`filled 64 MiB, checksum ${sum}`);
  const failed = await forkd.exec(source.id, ["exit", "3"]);
  console.log(`exit 3 -> exitCode ${failed.exitCode}`);

  // LIVE branch without waiting: returns while the memory is still copied.
  const branch = await forkd.branchSandbox(source.id, { tag, mode: "live", wait: false });
  console.log(
    `branched ${branch.tag}: ${SnapshotStatus[branch.snapshot!.status]}, paused ${branch.pauseMs.toFixed(2)} ms`,
  );
  for await (const update of forkd.watchSnapshot(branch.tag)) {
    console.log(
      `  watch: ${SnapshotStatus[update.status]} ${update.bytesCopied}/${update.bytesTotal} bytes`,
    );
  }

  // A child forked from the snapshot starts with the source's memory.
  const [child] = await forkd.spawnSandboxes({ tag: branch.tag });
  if (child === undefined) throw new Error("no child started");
  sandboxIds.push(child.id);
  const childSum = (await forkd.exec(child.id, ["checksum", "64"])).stdoutText.trim();
  console.log(`child ${child.id} checksum ${childSum} (${childSum === sum ? "same" : "DIFFERENT"})`);

  // Errors carry the gRPC status.
  try {
    await forkd.getSandbox("sb-missing");
  } catch (err) {
    if (!(err instanceof ForkdError)) throw err;
    console.log(`getSandbox(sb-missing) -> ${err.codeName}: ${err.rawMessage}`);
  }

} finally {
  // Clean up: the sandboxes, then the snapshot (force: in case a child is left).
  for (const id of sandboxIds) {
    const sb = await forkd.deleteSandbox(id);
    console.log(`deleted sandbox ${sb.id}`);
  }
  const deleted = await forkd.deleteSnapshot(tag, { force: true }).catch((err: unknown) => {
    if (err instanceof ForkdError && err.codeName === "NOT_FOUND") return [];
    throw err;
  });
  console.log(`deleted snapshot(s): ${deleted.join(", ") || "none"}`);
}
