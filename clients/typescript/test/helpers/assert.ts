/** Assertions shared by the daemon test files. */
import assert from "node:assert/strict";
import { ForkdError } from "../../src/index.js";

/** Asserts that `promise` rejects with a ForkdError of `codeName`; returns it. */
export async function rejectsWith(promise: Promise<unknown>, codeName: string): Promise<ForkdError> {
  const err = await promise.then(
    () => assert.fail(`expected ${codeName}, got a result`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof ForkdError, `expected a ForkdError, got ${String(err)}`);
  assert.equal(err.codeName, codeName, err.message);
  return err;
}
