"""StepEvents (one per engine step) and the traces written from them."""
