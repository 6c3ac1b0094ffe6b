"""Test helper, run as a second process: a stand-in for a vhost-user backend.

`python -m tests.memclient SOCKET` joins a VM's memory socket (postcopy.vm.memshare): maps
its RAM, hands over a userfaultfd, prints one JSON line `{"mode", "page_size", "size"}`,
then answers JSON commands on stdin, one per line:
- `{"read": [page, ...]}`: reads those 4 KiB pages of block 0 (touching them: a page not
  yet migrated faults and waits) and prints `{"digests": [...], "longest": seconds}`;
- `{"wait_end": seconds}`: waits for the VM's postcopy-end, prints `{"ended": bool}`.
It exits at EOF. Nothing here handles its faults: the VM's destination does.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

from postcopy.vm.memshare import MemoryShareClient

PAGE = 4096


def main(path: str) -> int:
    client = MemoryShareClient(path, name="test-backend")
    try:
        mapping = client.mappings[0]
        assert mapping is not None, "block 0 was not shared"
        print(
            json.dumps(
                {"mode": client.mode, "page_size": mapping.page_size, "size": mapping.length}
            ),
            flush=True,
        )
        for line in sys.stdin:
            command = json.loads(line)
            if "read" in command:
                digests, longest = [], 0.0
                for page in command["read"]:
                    started = time.perf_counter()
                    data = bytes(mapping.view[page * PAGE : (page + 1) * PAGE])
                    longest = max(longest, time.perf_counter() - started)
                    digests.append(hashlib.sha256(data).hexdigest())
                print(json.dumps({"digests": digests, "longest": longest}), flush=True)
            elif "wait_end" in command:
                print(json.dumps({"ended": client.wait_end(command["wait_end"])}), flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
