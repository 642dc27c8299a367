"""KV memory: the token-level pool and the radix prefix cache (token ids and pages)."""
