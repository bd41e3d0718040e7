/**
 * Starts a real forkd daemon for a test file: a free loopback port, a temp
 * data directory, readiness polled with the client itself, SIGTERM after.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { accessSync, closeSync, constants, openSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Controller, type ControllerOptions } from "../../src/index.js";

/** The package directory (clients/typescript); this file runs from dist/test/helpers. */
const PACKAGE_DIR = resolve(fileURLToPath(import.meta.url), "../../../..");

/** The daemon binary: $FORKD_BIN, else the repository's release build. */
export const FORKD_BIN =
  process.env["FORKD_BIN"] ?? resolve(PACKAGE_DIR, "../../target/release/forkd");

const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 20_000;

/** Options of {@link startDaemon}. */
export interface DaemonOptions {
  /** Require this bearer token (written to a --token-file). */
  token?: string;
  /** Extra `forkd serve` arguments. */
  args?: readonly string[];
}

/** A running daemon owned by a test. */
export interface Daemon {
  /** `"127.0.0.1:PORT"`. */
  readonly target: string;
  /** A Controller for it (with the token, if any); closed by stop(). */
  readonly client: Controller;
  /** Another Controller for it with extra options; closed by stop(). */
  connect(options?: Omit<ControllerOptions, "target">): Controller;
  /** The last lines of the daemon's log. */
  logTail(lines?: number): Promise<string>;
  /** SIGTERM, wait for a clean exit, remove the data directory. */
  stop(): Promise<void>;
}

/** Starts a daemon and resolves once it answers ListSandboxes. */
export async function startDaemon(options: DaemonOptions = {}): Promise<Daemon> {
  try {
    accessSync(FORKD_BIN, constants.X_OK);
  } catch {
    throw new Error(
      `forkd binary not found at ${FORKD_BIN}: build it (cargo build --release -p forkd -p forkd-vmm) or set FORKD_BIN`,
    );
  }
  const dir = await mkdtemp(join(tmpdir(), "forkd-ts-test-"));
  const logPath = join(dir, "forkd.log");
  const target = `127.0.0.1:${await freePort()}`;
  const args = ["serve", "--listen", target, "--data-dir", join(dir, "data"), ...(options.args ?? [])];
  if (options.token !== undefined) {
    const tokenFile = join(dir, "token");
    await writeFile(tokenFile, `${options.token}\n`, { mode: 0o600 });
    args.push("--token-file", tokenFile);
  }

  // FORKD_TOKEN would turn auth on (or, when empty, stop the daemon).
  const env = { ...process.env };
  delete env["FORKD_TOKEN"];
  const logFd = openSync(logPath, "a");
  const proc = spawn(FORKD_BIN, args, { env, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  let spawnError: Error | undefined;
  proc.once("error", (err) => {
    spawnError = err;
  });
  const exited = new Promise<void>((r) => proc.once("close", () => r()));
  // Should the test process exit without stop() (a crash), take the daemon along.
  const killOnExit = (): void => {
    proc.kill("SIGTERM");
  };
  process.once("exit", killOnExit);

  const controllers: Controller[] = [];
  const connect = (extra: Omit<ControllerOptions, "target"> = {}): Controller => {
    const c = new Controller({ token: options.token, ...extra, target });
    controllers.push(c);
    return c;
  };
  const logTail = async (lines = 30): Promise<string> => {
    const text = await readFile(logPath, "utf8").catch(() => "");
    return text.trimEnd().split("\n").slice(-lines).join("\n");
  };
  const stop = async (): Promise<void> => {
    for (const c of controllers) {
      c.close();
    }
    process.off("exit", killOnExit);
    await terminate(proc, exited, logTail);
    await rm(dir, { recursive: true, force: true });
  };

  const client = connect();
  try {
    await waitReady(client, proc, () => spawnError);
  } catch (err) {
    const tail = await logTail();
    await stop().catch(() => undefined);
    throw new Error(`forkd did not start on ${target}: ${String(err)}\n--- daemon log ---\n${tail}`);
  }
  return { target, client, connect, logTail, stop };
}

async function waitReady(
  client: Controller,
  proc: ChildProcess,
  spawnError: () => Error | undefined,
): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    const err = spawnError();
    if (err !== undefined) {
      throw err;
    }
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`exited early (code ${proc.exitCode}, signal ${proc.signalCode})`);
    }
    try {
      await client.listSandboxes();
      return;
    } catch (err) {
      if (Date.now() > deadline) {
        throw err;
      }
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function terminate(
  proc: ChildProcess,
  exited: Promise<void>,
  logTail: () => Promise<string>,
): Promise<void> {
  if (proc.pid === undefined || proc.exitCode !== null || proc.signalCode !== null) {
    return;
  }
  proc.kill("SIGTERM");
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<"timeout">((r) => {
    timer = setTimeout(() => r("timeout"), STOP_TIMEOUT_MS);
  });
  const outcome = await Promise.race([exited, timedOut]);
  clearTimeout(timer);
  if (outcome === "timeout") {
    proc.kill("SIGKILL");
    await exited;
    throw new Error(`forkd ignored SIGTERM for ${STOP_TIMEOUT_MS} ms\n${await logTail()}`);
  }
  if (proc.exitCode !== 0) {
    throw new Error(
      `forkd exited with code ${proc.exitCode} (signal ${proc.signalCode}) on SIGTERM\n${await logTail()}`,
    );
  }
}

/** A loopback TCP port that was free a moment ago. */
async function freePort(): Promise<number> {
  const srv = createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const addr = srv.address();
  srv.close();
  await once(srv, "close");
  if (addr === null || typeof addr === "string") {
    throw new Error("no TCP address");
  }
  return addr.port;
}
