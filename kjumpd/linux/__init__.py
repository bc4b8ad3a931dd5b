"""Parsers of what Linux shows (kernel command line, kernel build configuration): one
definition each, shared by the daemon (A), the save kernel's agent (B) and the restore-first
environment (R). Standard library only."""
