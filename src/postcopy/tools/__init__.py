"""What the user's tools share: `postcopy` commands (cli), the benchmarks (bench), the tests.

- `qmpclient`: one synchronous QMP client (the package's own: `make demo` installs no
  qemu.qmp for the commands to lean on);
- `vmchild`: start a `postcopy vm run` process and wait until its QMP socket accepts;
  `free_port`;
- `watch`: QEMU's final migration statuses and the loop that polls both sides until both
  are final;
- `signals`: the one way to swap SIGINT/SIGTERM handlers for a while;
- `runfile`: the run record (JSON lines, both sides on one clock) that `migrate
  --timeline`, `demo` and `bench` write and `report` and `bench --from` read;
- `plot`: the one plotter of a run.

Layer 7 of docs/ARCHITECTURE.md: below cli and bench, which both import it; it imports
neither.
"""
