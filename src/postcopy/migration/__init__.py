"""The outgoing and incoming migration state machines: precopy, switchover, postcopy."""
