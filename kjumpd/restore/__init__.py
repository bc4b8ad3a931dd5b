"""R, the restore-first environment the boot loader starts: the decision (pure) and its
/init (the edge). It imports only the shared core."""
