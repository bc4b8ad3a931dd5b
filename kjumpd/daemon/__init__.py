"""A, the main kernel's side: the daemon (main), the D-Bus service, the hibernate transaction
and its steps. Nothing in the shared core, the agent (B) or the restore-first environment (R)
imports this package."""
