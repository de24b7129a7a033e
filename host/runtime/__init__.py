"""Running the component: loading with a compile cache, a fresh store per invocation with
Temper's budgets, the same guest run natively, the epoch ticker, and wasmtime-py fixes."""
