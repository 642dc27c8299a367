"""Who runs next: requests, admission policies (Past-Future, conservative, aggressive), the waiting queue, the scheduler and its decisions."""
