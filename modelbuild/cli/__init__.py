"""The commands: python -m modelbuild (main), why, plan, report, release, init."""
