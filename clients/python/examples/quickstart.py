"""A worked example: boot a sandbox, run commands, live-branch it without
waiting, follow the copy to READY, fork children from the snapshot, clean up.

    python clients/python/examples/quickstart.py [TARGET]
"""

from __future__ import annotations

import sys

import forkd


def main(target: str) -> None:
    with forkd.Controller(target, timeout=60) as ctl:
        sb = ctl.spawn_sandboxes(memory_mib=128, labels={"example": "quickstart"})[0]
        print(f"spawned {sb.id} in {sb.boot_ms:.1f} ms")

        ctl.exec(sb.id, ["fill", "64", "42"])  # warm state: 64 MiB of pattern
        warm = ctl.exec(sb.id, ["checksum"]).text.strip()
        print(f"checksum in the source: {warm}")

        branch = ctl.branch_sandbox(sb.id, "quickstart", mode="live", wait=False)
        status = forkd.status_name(branch.snapshot.status)
        print(f"live branch paused the guest {branch.pause_ms:.2f} ms; snapshot is {status}")
        ctl.exec(sb.id, ["fill", "64", "7"])  # the source moves on meanwhile

        for update in ctl.watch_snapshot(branch.tag, timeout=120):
            name = forkd.status_name(update.status)
            print(f"  {name}: {update.bytes_copied} of {update.bytes_total} bytes copied")

        children = ctl.spawn_sandboxes(branch.tag, n=3)
        for child in children:
            print(f"child {child.id}: checksum {ctl.exec(child.id, ['checksum']).text.strip()}")

        try:
            ctl.get_sandbox("sb-missing")
        except forkd.NotFoundError as e:
            print(f"expected error: {e.code_name}: {e.message}")

        for s in [sb, *children]:
            ctl.delete_sandbox(s.id)
        print("deleted:", ctl.delete_snapshot(branch["tag"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else forkd.DEFAULT_TARGET)
