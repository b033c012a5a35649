"""Production guardrails: who is calling (keys, quotas), what is admitted, what is recorded."""
