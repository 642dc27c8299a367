"""The engine room: one step of serving (runner, CUDA graphs, sampler, detokenizer, overlap) and the Engine API."""
