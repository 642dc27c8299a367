"""The scheduler simulator and its workloads (ShareGPT and synthetic lengths)."""
