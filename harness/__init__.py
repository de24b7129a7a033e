"""The harness around the product in `host`: the mock E2B and LLM servers (`mocks`), a
simulator of Temper's sessions and executor (`simulator`), several hosts on one Redis and
the soak (`multihost`), and a Temper-ABI host that runs the shim (`temper_abi`). It imports
the product; the product never imports it (tests/host/test_product_apart.py)."""
