"""Files in and out of a Linux sandbox: upload bytes and a local file,
run what was uploaded, list and stat, download into a local file, remove.

    python clients/python/examples/files.py SANDBOX_ID [TARGET]

SANDBOX_ID is a running Linux sandbox (spawned with an image, which needs a
host with VMX or SVM). The token, if the daemon wants one, comes from
FORKD_TOKEN.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import forkd


def main(sandbox_id: str, target: str) -> None:
    with forkd.Controller(target, token=os.environ.get("FORKD_TOKEN"), timeout=600) as ctl, \
            tempfile.TemporaryDirectory() as tmp:
        script = b"#!/bin/sh\necho \"hello from $(hostname)\"\n"
        up = ctl.write_file(sandbox_id, "/root/demo/hello.sh", script, mode=0o755, make_parents=True)
        print(f"wrote {up.path}: {up.size} bytes, sha256 {up.sha256[:16]}...")
        print(ctl.exec(sandbox_id, ["/root/demo/hello.sh"]).text, end="")

        local = Path(tmp) / "data.bin"
        local.write_bytes(os.urandom(3 << 20))
        up = ctl.write_file(sandbox_id, "/root/demo/data.bin", local)  # a local path: streamed
        print(f"uploaded {local.name}: {up.size} bytes, same sha256 as here: "
              f"{up.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()}")

        for entry in ctl.list_dir(sandbox_id, "/root/demo"):
            print(f"  {entry.name:10} {entry.type:9} {oct(entry.mode)} {entry.size}")
        info = ctl.stat_file(sandbox_id, "/root/demo/hello.sh")
        print(f"stat hello.sh: is_file={info.is_file} mode={oct(info.mode)}")

        back = ctl.read_file(sandbox_id, "/root/demo/data.bin", Path(tmp) / "back.bin")
        print(f"downloaded {back.size} bytes; identical: {(Path(tmp) / 'back.bin').read_bytes() == local.read_bytes()}")
        print(f"first line of /etc/os-release: {ctl.read_file(sandbox_id, '/etc/os-release').splitlines()[0].decode()}")

        try:
            ctl.write_file(sandbox_id, "/root/demo/hello.sh", b"x", no_overwrite=True)
        except forkd.AlreadyExistsError as e:
            print(f"expected error: {e.code_name}: {e.message}")
        ctl.remove_file(sandbox_id, "/root/demo", recursive=True)
        try:
            ctl.stat_file(sandbox_id, "/root/demo")
        except forkd.NotFoundError as e:
            print(f"after remove_file: {e.code_name}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:50051")
