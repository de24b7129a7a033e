"""Running the component: loading with a compile cache (on wasmtime's default or pooling
allocator), a fresh store per invocation with Temper's budgets, a pool of worker processes
to use every core, the same guest run natively, the epoch ticker, and wasmtime-py fixes."""
