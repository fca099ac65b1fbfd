"""The engine: bringing one stage up to date (decide, then restore, run or push)."""
