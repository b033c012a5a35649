"""`shoal bench`: load a server with a workload, measure it, and report (text and HTML)."""
